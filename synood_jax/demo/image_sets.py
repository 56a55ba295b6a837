"""A small generated image set for the demo and the tests: ID classes plus held-out OOD classes.

Each class is a pattern family (stripes, rings, checks, blobs, ...) with its own hue; every image draws
its frequency, phase, colour jitter and JPEG quality from a seed, so bytes per pixel differ between
images and source selection has something to choose.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from synood_jax import fileio


def _pattern(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
  y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
  f = rng.uniform(3, 9)
  a = rng.uniform(0, np.pi)
  if kind == "stripes":
    v = np.sin(2 * np.pi * f * (x * np.cos(a) + y * np.sin(a)))
  elif kind == "rings":
    cx, cy = rng.uniform(0.3, 0.7, size=2)
    v = np.sin(2 * np.pi * f * np.hypot(x - cx, y - cy))
  elif kind == "checks":
    v = np.sign(np.sin(2 * np.pi * f * x) * np.sin(2 * np.pi * f * y))
  elif kind == "blobs":
    v = np.zeros_like(x)
    for _ in range(6):
      cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
      v += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
    v = 2 * v / max(v.max(), 1e-6) - 1
  elif kind == "waves":
    v = np.sin(2 * np.pi * f * x + 2 * np.sin(2 * np.pi * y * f / 2))
  else:  # dots
    v = np.cos(2 * np.pi * f * x) + np.cos(2 * np.pi * f * y)
    v = v / 2
  return v


def make_image(kind: str, hue: float, size: int, rng: np.random.Generator) -> np.ndarray:
  """A uint8 HxWx3 image: the pattern mapped between two colours around `hue`, plus pixel noise."""
  v = (_pattern(kind, size, rng) + 1) / 2
  base = np.array([np.cos(2 * np.pi * (hue + k / 3)) for k in range(3)]) * 0.4 + 0.5
  other = 1 - base + rng.normal(0, 0.05, 3)
  img = v[..., None] * base + (1 - v[..., None]) * other
  img += rng.normal(0, rng.uniform(0.01, 0.08), img.shape)
  return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_demo_images(root: str, classes: dict[str, tuple[str, float]], per_class: int, size: int = 64,
                      seed: int = 0, ext: str = ".JPEG") -> dict[str, list[str]]:
  """Write `root/<class>/<class>_<i>.JPEG` for each class -> (pattern, hue); returns the paths."""
  out = {}
  for ci, (name, (kind, hue)) in enumerate(sorted(classes.items())):
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng([seed, ci])
    paths = []
    for i in range(per_class):
      path = os.path.join(folder, f"{name}_{i:04d}{ext}")
      quality = int(rng.integers(40, 96))
      pixels = make_image(kind, hue, size, rng)  # drawn even when the file exists: same stream on rerun
      if not os.path.exists(path):
        fileio.atomic_write(path, lambda f, p=pixels, q=quality: Image.fromarray(p).save(f, format="JPEG", quality=q))
      paths.append(path)
    out[name] = paths
  return out

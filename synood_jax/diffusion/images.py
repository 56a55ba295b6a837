"""Host-side image and mask conventions of diffusers' in-painting pipeline (its VaeImageProcessor), NHWC.

image: PIL (converted to RGB) or arrays [H, W, 3] / [N, H, W, 3], uint8 (divided by 255) or float in
  [0, 1]; -> x = 2 * image - 1 in [-1, 1].
mask: PIL (converted to grayscale "L") or arrays [H, W] / [H, W, 1] / [N, H, W] / [N, H, W, 1], same value
  rules; 1 (white) = repaint, 0 = keep; binarized as diffusers does: m = 1[mask >= 0.5].
PIL images of another size are resized to (height, width) with Lanczos, as diffusers does; arrays must
already have that size. Outputs go back to PIL with `to_pil` (round(255 x), diffusers' numpy_to_pil).
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def _as_list(x) -> list:
  if isinstance(x, (list, tuple)):
    return list(x)
  if isinstance(x, np.ndarray) or hasattr(x, "__array__") and not isinstance(x, Image.Image):
    return [np.asarray(x)]
  return [x]


def _unit_range(x: np.ndarray, what: str) -> np.ndarray:
  """uint8 -> / 255; floats must already lie in [0, 1] (diffusers' convention for arrays)."""
  if x.dtype == np.uint8:
    return x.astype(np.float32) / np.float32(255)
  if x.dtype == bool:
    return x.astype(np.float32)
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"{what}: want uint8 or float pixels, got dtype {x.dtype}")
  lo, hi = float(x.min()), float(x.max())
  if lo < 0 or hi > 1:
    raise ValueError(f"{what}: float pixels must lie in [0, 1] (diffusers' convention), got [{lo:.3g}, "
                     f"{hi:.3g}]; for [-1, 1] images pass (x + 1) / 2")
  return x.astype(np.float32)


def _pil(im: Image.Image, mode: str, height: int, width: int) -> np.ndarray:
  if im.size != (width, height):
    im = im.resize((width, height), resample=Image.Resampling.LANCZOS)  # diffusers resizes before converting
  return np.asarray(im.convert(mode), np.float32) / np.float32(255)


def _one(item, what: str, channels: int, height: int, width: int) -> np.ndarray:
  """-> [n, H, W, channels] float32 in [0, 1]."""
  if isinstance(item, Image.Image):
    x = _pil(item, "RGB" if channels == 3 else "L", height, width)
    return x.reshape((1, height, width, channels))
  x = np.asarray(item)
  if channels == 1:  # masks: [H, W], [H, W, 1], [N, H, W], [N, H, W, 1]
    if x.ndim == 2 or (x.ndim == 3 and x.shape[-1] == 1):
      x = x[None]
    if x.ndim == 3:
      x = x[..., None]
  elif x.ndim == 3:
    x = x[None]
  if x.ndim != 4 or x.shape[-1] != channels:
    want = "[H, W, 3] or [N, H, W, 3]" if channels == 3 else "[H, W], [H, W, 1], [N, H, W] or [N, H, W, 1]"
    raise ValueError(f"{what}: want an NHWC array {want}, got shape {np.shape(item)}")
  if x.shape[1:3] != (height, width):
    raise ValueError(f"{what}: array of size {x.shape[1]}x{x.shape[2]}, want {height}x{width} "
                     f"(resize it, pass it as a PIL image, or pass height= and width=)")
  return _unit_range(x, what)


def to_batch(items, what: str, channels: int, height: int, width: int, batch: int) -> np.ndarray:
  """A PIL image, an array or a list of them -> [batch, H, W, channels] float32 in [0, 1]; one image
  is repeated for every row, as diffusers repeats a single image for a list of prompts."""
  parts = [_one(x, what, channels, height, width) for x in _as_list(items)]
  if not parts:
    raise ValueError(f"{what}: no images given")
  x = np.concatenate(parts, axis=0)
  if x.shape[0] == 1 and batch > 1:
    x = np.repeat(x, batch, axis=0)
  if x.shape[0] != batch:
    raise ValueError(f"{what}: {x.shape[0]} images for {batch} prompts (give one, or one per prompt)")
  return x


def first_size(items) -> tuple[int, int]:
  """(height, width) of the first image (PIL or NHWC / HWC array)."""
  x = _as_list(items)[0]
  if isinstance(x, Image.Image):
    return x.height, x.width
  x = np.asarray(x)
  return (x.shape[1], x.shape[2]) if x.ndim == 4 else (x.shape[0], x.shape[1])


def image_and_mask(image, mask_image, height: int, width: int, batch: int):
  """diffusers' preprocessing: (x in [-1, 1] [B, H, W, 3], binarized mask [B, H, W, 1] in {0, 1})."""
  x = to_batch(image, "image", 3, height, width, batch) * 2 - 1
  mask = to_batch(mask_image, "mask_image", 1, height, width, batch)
  return x, (mask >= 0.5).astype(np.float32)


def to_pil(images) -> list[Image.Image]:
  """[N, H, W, 3] values in [0, 1] -> PIL images (round(255 x), as diffusers' numpy_to_pil)."""
  x = np.asarray(images, np.float32)
  x = x[None] if x.ndim == 3 else x
  return [Image.fromarray(im) for im in (x * 255).round().astype(np.uint8)]


__all__ = ["image_and_mask", "to_batch", "to_pil", "first_size"]

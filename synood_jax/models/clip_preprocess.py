"""CLIP image preprocessing, equal to transformers' CLIPImageProcessor (PIL backend), output NHWC float32.

x = (resize_bicubic_shortest_side(img) [centre crop] * 1/255 - mean) / std. Resizing goes through PIL on
uint8 pixels exactly as transformers does, so results match it bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np
from PIL import Image

from synood_jax import decode
from synood_jax.models.checkpoint_io import CheckpointError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  shortest_edge: int = 224
  crop_height: int = 224
  crop_width: int = 224
  resample: int = 3  # PIL.Image.BICUBIC
  do_resize: bool = True
  do_center_crop: bool = True
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  image_std: tuple[float, ...] = OPENAI_CLIP_STD


def _edge(value, path: str) -> int:
  if isinstance(value, int):  # old configs: "size": 224 means the shortest edge for CLIP
    return value
  if isinstance(value, dict) and "shortest_edge" in value:
    return int(value["shortest_edge"])
  raise CheckpointError(f"{path}: size {value!r} not supported (want an int or {{'shortest_edge': n}})")


def _crop(value, path: str) -> tuple[int, int]:
  if isinstance(value, int):
    return value, value
  if isinstance(value, dict) and "height" in value and "width" in value:
    return int(value["height"]), int(value["width"])
  raise CheckpointError(f"{path}: crop_size {value!r} not supported (want an int or height/width)")


def load_config(folder: str | None = None) -> PreprocessConfig:
  """The folder's preprocessor_config.json read over CLIP's defaults; the defaults if there is none."""
  path = os.path.join(folder, "preprocessor_config.json") if folder else None
  if not path or not os.path.isfile(path):
    return PreprocessConfig()
  with open(path) as f:
    raw = json.load(f)
  d = PreprocessConfig()
  crop = _crop(raw["crop_size"], path) if "crop_size" in raw else (d.crop_height, d.crop_width)
  return PreprocessConfig(
      shortest_edge=_edge(raw["size"], path) if "size" in raw else d.shortest_edge,
      crop_height=crop[0], crop_width=crop[1], resample=int(raw.get("resample", d.resample)),
      do_resize=bool(raw.get("do_resize", True)), do_center_crop=bool(raw.get("do_center_crop", True)),
      do_rescale=bool(raw.get("do_rescale", True)),
      rescale_factor=float(raw.get("rescale_factor", d.rescale_factor)),
      do_normalize=bool(raw.get("do_normalize", True)),
      image_mean=tuple(raw.get("image_mean", d.image_mean)), image_std=tuple(raw.get("image_std", d.image_std)))


def to_rgb_uint8(image) -> np.ndarray:
  """HWC uint8 RGB from a PIL image (the one conversion every stage uses, `synood_jax/decode.py`: alpha
  composited on white, as transformers does; 16-bit and float scaled) or an array."""
  if isinstance(image, Image.Image):
    return np.asarray(decode.to_rgb(image))
  x = np.asarray(image)
  if x.ndim == 2:
    x = x[..., None]
  if x.ndim != 3 or x.shape[-1] not in (1, 3):
    raise ValueError(f"preprocess: want an HWC image with 1 or 3 channels, got shape {x.shape}")
  if x.dtype != np.uint8:
    # transformers turns integral floats into uint8 and (differently) rescales [0, 1] floats twice:
    # accept the unambiguous case only.
    if not np.all(np.equal(np.mod(x, 1), 0)) or x.min() < 0 or x.max() > 255:
      raise ValueError(f"preprocess: want uint8 pixels (or integral values in [0, 255]), got {x.dtype} "
                       f"in [{x.min()}, {x.max()}]; convert with (x * 255).round().astype(np.uint8)")
    x = x.astype(np.uint8)
  return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def resize_shortest_edge(x: np.ndarray, edge: int, resample: int) -> np.ndarray:
  h, w = x.shape[:2]
  short, long = (w, h) if w <= h else (h, w)
  new_long = int(edge * long / short)  # truncation, as transformers (and torchvision) do
  new_h, new_w = (new_long, edge) if w <= h else (edge, new_long)
  return np.asarray(Image.fromarray(x).resize((new_w, new_h), resample=resample))


def center_crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
  """Centre crop; an image smaller than the crop is zero-padded around it first (transformers' rule)."""
  h, w = x.shape[:2]
  top, left = (h - height) // 2, (w - width) // 2
  if top >= 0 and left >= 0:
    return x[top:top + height, left:left + width]
  ph, pw = max(height, h), max(width, w)
  pad_top, pad_left = -(-(ph - h) // 2), -(-(pw - w) // 2)  # ceil
  padded = np.zeros((ph, pw) + x.shape[2:], x.dtype)
  padded[pad_top:pad_top + h, pad_left:pad_left + w] = x
  top, left = top + pad_top, left + pad_left
  return padded[max(0, top):top + height, max(0, left):left + width]


def preprocess_image(image, config: PreprocessConfig = PreprocessConfig()) -> np.ndarray:
  """One image -> float32 HWC."""
  x = to_rgb_uint8(image)
  if config.do_resize:
    x = resize_shortest_edge(x, config.shortest_edge, config.resample)
  if config.do_center_crop:
    x = center_crop(x, config.crop_height, config.crop_width)
  x = x.astype(np.float32)
  if config.do_rescale:  # float64 product then float32, as transformers' rescale
    x = (x.astype(np.float64) * config.rescale_factor).astype(np.float32)
  if config.do_normalize:
    x = (x - np.asarray(config.image_mean, np.float32)) / np.asarray(config.image_std, np.float32)
  return x


def preprocess(images: Sequence | np.ndarray, config: PreprocessConfig = PreprocessConfig()) -> np.ndarray:
  """A list of images (PIL or HWC arrays) or an NHWC uint8 array -> float32 NHWC batch."""
  if isinstance(images, np.ndarray) and images.ndim == 4:
    images = list(images)
  elif isinstance(images, (Image.Image, np.ndarray)):
    images = [images]
  return np.stack([preprocess_image(im, config) for im in images])

"""One conversion of a decoded image to 8-bit RGB, for every stage that reads images: synthesis sources
(`synthesize.load_source_image`), CLIP features of files (`clip_preprocess.to_rgb_uint8`) and the
report's image grid. Before, synthesis and CLIP converted differently (RGBA lost its alpha in one and was
composited on white in the other) and a 16-bit PNG reached synthesis with 95.6% of its pixels clipped
to white.

Each PIL mode, one way:
- 16-bit integer grey (modes I;16, I;16L, I;16B, I;16N, and I, which PIL gives 16-bit PNG and TIFF
  grey): scaled, v * 255 / 65535, rounded. Mode I is read as 16-bit (0..65535); values beyond are clipped.
- float grey (mode F): taken as [0, 1], scaled by 255 and rounded; values outside [0, 1] are clipped.
- alpha (RGBA, LA, PA, RGBa, La, and a palette, grey or RGB image with a `transparency` entry):
  composited on white, as transformers' CLIPImageProcessor does.
- palette (P): expanded through its palette. CMYK: PIL's conversion (no colour profile is applied).
- grey (L, 1): replicated to the three channels.
- RGB: as it is (16-bit RGB PNGs are already reduced to 8 bits by PIL's decoder).
The diffusers-compatible in-painting API (`diffusion/images.py`) keeps diffusers' own conversion.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _has_alpha(im: Image.Image) -> bool:
  return "A" in im.getbands() or "a" in im.getbands() or im.info.get("transparency") is not None


def to_rgb(im: Image.Image) -> Image.Image:
  """An 8-bit RGB copy of `im` (any PIL mode), converted as the module says."""
  if im.mode in SIXTEEN_BIT:
    grey = np.asarray(im).astype(np.float64) * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8)).convert("RGB")
  if im.mode == "F":
    grey = np.clip(np.asarray(im, np.float64), 0.0, 1.0) * 255.0
    return Image.fromarray(np.round(grey).astype(np.uint8)).convert("RGB")
  if _has_alpha(im):
    rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
  return im if im.mode == "RGB" else im.convert("RGB")

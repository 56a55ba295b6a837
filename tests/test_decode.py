"""One image decoder for every stage (issue 19, case 6): each PIL mode, written to a file, read by the
synthesis source loader and by the CLIP feature loader, against a numpy reference of the documented rule.

Before: a 16-bit PNG reached synthesis with most pixels clipped to white, and RGBA lost its alpha in
synthesis but was composited on white for CLIP features."""
import numpy as np
import pytest
from PIL import Image

from synood_jax import decode
from synood_jax.data import datasets as data
from synood_jax.models import clip_preprocess
from synood_jax.synthesis import synthesize

H = W = 16
rng = np.random.default_rng(0)


def _img(x, mode):
  return Image.frombytes(mode, (W, H), np.ascontiguousarray(x).tobytes())


def _white_composite(rgb, alpha):
  a = alpha.astype(np.float64)[..., None] / 255.0
  return rgb.astype(np.float64) * a + 255.0 * (1.0 - a)


def _case(mode):
  """(PIL image to save, file extension, expected uint8 RGB [H, W, 3])."""
  if mode == "I;16":
    v = rng.integers(0, 65536, (H, W)).astype(np.uint16)
    v[0, :4] = (0, 257, 32768, 65535)
    return _img(v, "I;16"), "png", np.repeat(np.round(v / 257.0)[..., None], 3, -1)
  if mode == "I":  # 32-bit integer grey holding 16-bit values (what PIL gives some 16-bit files)
    v = rng.integers(0, 65536, (H, W)).astype(np.int32)
    return _img(v, "I"), "tif", np.repeat(np.round(v * 255.0 / 65535.0)[..., None], 3, -1)
  if mode == "F":
    v = rng.random((H, W), dtype=np.float32)
    v[0, 0], v[0, 1] = 1.0, 0.0
    return _img(v, "F"), "tif", np.repeat(np.round(v.astype(np.float64) * 255)[..., None], 3, -1)
  if mode == "RGBA":
    x = rng.integers(0, 256, (H, W, 4)).astype(np.uint8)
    return _img(x, "RGBA"), "png", _white_composite(x[..., :3], x[..., 3])
  if mode == "LA":
    x = rng.integers(0, 256, (H, W, 2)).astype(np.uint8)
    return _img(x, "LA"), "png", _white_composite(np.repeat(x[..., :1], 3, -1), x[..., 1])
  if mode in ("P", "P+transparency"):
    palette = rng.integers(0, 256, (256, 3)).astype(np.uint8)
    index = rng.integers(0, 256, (H, W)).astype(np.uint8)
    im = _img(index, "P")
    im.putpalette(palette.ravel().tolist())
    want = palette[index].astype(np.float64)
    if mode == "P+transparency":
      im.info["transparency"] = int(index[0, 0])
      want[index == index[0, 0]] = 255.0
    return im, "png", want
  if mode == "CMYK":
    x = rng.integers(0, 256, (H, W, 4)).astype(np.uint8)
    c, k = x[..., :3].astype(np.float64), x[..., 3:].astype(np.float64)
    return _img(x, "CMYK"), "tif", (255 - c) * (255 - k) / 255.0
  if mode == "L":
    x = rng.integers(0, 256, (H, W)).astype(np.uint8)
    return _img(x, "L"), "png", np.repeat(x[..., None], 3, -1).astype(np.float64)
  if mode == "1":
    x = rng.integers(0, 2, (H, W)).astype(bool)
    return Image.fromarray(x), "png", np.repeat(x[..., None] * 255.0, 3, -1)
  if mode == "RGB":
    x = rng.integers(0, 256, (H, W, 3)).astype(np.uint8)
    return _img(x, "RGB"), "png", x.astype(np.float64)
  raise ValueError(mode)


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "RGBA", "LA", "P", "P+transparency", "CMYK", "L", "1", "RGB"])
def test_every_stage_reads_each_mode_one_way(mode, tmp_path):
  im, ext, want = _case(mode)
  path = str(tmp_path / f"image.{ext}")
  save = {"transparency": im.info["transparency"]} if "transparency" in im.info else {}
  im.save(path, **save)
  with Image.open(path) as check:  # the file really holds the mode under test
    assert check.mode == (im.mode if mode != "I;16" else check.mode) and (mode != "I;16" or check.mode.startswith("I"))
  # synthesis: [-1, 1] floats of the same size (no resampling at the image's own size)
  synth = (synthesize.load_source_image(path, H) + 1.0) * 127.5
  # CLIP features: the evaluation's dataset reader, then the preprocessing's conversion
  clip = clip_preprocess.to_rgb_uint8(data.Dataset("d", [data.Record(path)]).open_image(0)).astype(np.float64)
  np.testing.assert_allclose(clip, want, atol=1.0, err_msg=f"{mode}: CLIP features")
  np.testing.assert_allclose(synth, clip, atol=1e-3, err_msg=f"{mode}: synthesis differs from CLIP features")


def test_sixteen_bit_is_scaled_not_clipped():
  v = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
  out = np.asarray(decode.to_rgb(_img(v, "I;16")))
  assert (out == 255).mean() < 0.01 and out.max() == 255 and out.min() == 0  # PIL's convert: ~99% white

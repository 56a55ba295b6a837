"""Runs README.md's code blocks marked `<!-- readme-example -->`, in order and in one namespace, on tiny
random models written as HF / diffusers folders (our save_pretrained), offline, so README and code cannot
drift apart. The model paths in the README are swapped for the tiny folders."""
import os
import re

import numpy as np
import pytest
from PIL import Image

from synood_jax.demo import tiny_clip, tiny_sd

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
MARKER = "<!-- readme-example -->"
PATHS = {"/models/clip-vit-base-patch16": "clip", "/models/stable-diffusion-2-inpainting": "sd"}


def readme_blocks() -> list[str]:
  """The ```python block right after each line that is the marker (one not followed by a block fails)."""
  with open(README) as f:
    text = f.read()
  markers = [line for line in text.splitlines() if line.strip() == MARKER]
  blocks = re.findall(r"^" + re.escape(MARKER) + r"\n```python\n(.*?)\n```", text, re.M | re.S)
  assert len(blocks) == len(markers), f"README.md: a {MARKER} line is not followed by a ```python block"
  return blocks


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  root = tmp_path_factory.mktemp("readme")
  folders = {"clip": tiny_clip.make_tiny_clip(str(root / "clip"), seed=0),
             "sd": tiny_sd.make_tiny_inpaint_pipeline(str(root / "sd"), seed=0)}
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "photo.png")
  mask = np.zeros((40, 48), np.uint8)
  mask[8:32, 10:40] = 255
  Image.fromarray(mask).save(root / "mask.png")
  return root, folders


def test_readme_examples_run(workdir, monkeypatch):
  root, folders = workdir
  monkeypatch.chdir(root)
  assert os.environ.get("HF_HUB_OFFLINE") == "1"
  blocks = readme_blocks()
  assert len(blocks) >= 3, "README lost its 'Use the models on their own' examples"
  source = "\n".join(blocks)
  for path, key in PATHS.items():
    assert path in source, f"README examples no longer load {path}; update PATHS"
    source = source.replace(path, folders[key])
  namespace = {}
  exec(compile(source, "README.md examples", "exec"), namespace)

  probs = namespace["result"].probs
  assert probs.shape == (1, 3)
  np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
  out = np.asarray(namespace["out"])
  assert out.shape == (1, 32, 32, 3) and out.min() >= 0 and out.max() <= 1  # tiny UNet: 16 x 2 pixels
  assert Image.open(root / "barn.png").size == (32, 32)
  out16 = np.asarray(namespace["out16"])
  assert out16.shape == (4, 32, 32, 3) and np.isfinite(out16).all() and out16.min() >= 0 and out16.max() <= 1
  assert namespace["scores"].logits.shape == (4, 4)

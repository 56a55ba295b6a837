"""Runs README.md's code blocks marked `<!-- readme-example -->`, each on its own in a fresh namespace (a
reader copies one block, not all of them), on tiny random models written as HF / diffusers folders (our
save_pretrained), offline, in an empty folder, so README and code cannot drift apart. The model paths in
the README are swapped for the tiny folders."""
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
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("readme_models")
  return {"clip": tiny_clip.make_tiny_clip(str(root / "clip"), seed=0),
          "sd": tiny_sd.make_tiny_inpaint_pipeline(str(root / "sd"), seed=0)}


def _run(block: str, folders: dict) -> dict:
  for path, key in PATHS.items():
    block = block.replace(path, folders[key])
  namespace = {}
  exec(compile(block, "README.md example", "exec"), namespace)
  return namespace


def test_readme_examples_run_each_on_its_own(folders, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # an empty folder: a block needing a file the reader lacks fails here
  assert os.environ.get("HF_HUB_OFFLINE") == "1"
  blocks = readme_blocks()
  assert len(blocks) >= 3, "README lost its 'Use the models on their own' examples"
  for path in PATHS:
    assert any(path in b for b in blocks), f"README examples no longer load {path}; update PATHS"
  first, second, third = (_run(b, folders) for b in blocks[:3])

  probs = first["result"].probs
  assert probs.shape == (1, 3)
  np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
  out = np.asarray(second["out"])
  assert out.shape == (1, 32, 32, 3) and out.min() >= 0 and out.max() <= 1  # tiny UNet: 16 x 2 pixels
  assert Image.open(tmp_path / "barn.png").size == (32, 32)
  out16 = np.asarray(third["out16"])
  assert out16.shape == (4, 32, 32, 3) and np.isfinite(out16).all() and out16.min() >= 0 and out16.max() <= 1
  assert third["result16"].logits.shape == (4, 4) and third["result16"].probs.shape == (4, 4)

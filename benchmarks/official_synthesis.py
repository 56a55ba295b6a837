"""The official SynOOD synthesis procedure in PyTorch, as the benchmarks run it; no JAX is imported here,
so a cold process of it pays only for what the official code needs (torch, diffusers).

Reference: `official_loop` of synood_jax/testing/torch_reference.py, the official `generate_near_ood_sample.py` loop on
diffusers' StableDiffusionInpaintPipeline (which agrees with the official modified pipeline given
identical latents), with a random torchvision-layout ResNet-50 and its transforms. Per batch: VAE-encode
the sources and sample the posterior, draw eps; then K times: z_t = add_noise(z_in, eps, t0); under
no_grad pipe(..., masked_image_latents=<the all-zero image in PIXEL space, encoded and sampled by the
pipeline on every call>, latents=z_t, output_type='latent'); with grad: decode z0 / scale, ResNet-50,
L = mean((m - s)^2), backward (parameters keep requires_grad, as in the official code), eps -= r dL/du,
the last update included.

Run as a script it is the official side of `synthesis_vs_reference.py --cold`: one batch in a fresh
process, timed, its breakdown printed as JSON.
"""
from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch's OpenMP starts: before any import of it
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (also puts the repository root and tests/ on sys.path)
from common import FLAGS  # noqa: E402

from absl import app  # noqa: E402


class Official:
  """The official procedure on a saved pipeline folder and ResNet-50 state dict."""

  def __init__(self, folder: str, resnet_path: str):
    import torch
    from synood_jax.testing.torch_reference import official_loop, random_resnet  # pylint: disable=import-outside-toplevel
    self.torch, self.loop, self.dev, self.dtype = torch, official_loop, common.torch_device(), common.torch_dtype()
    self.pipe = common.load_torch_pipeline(folder)
    model = random_resnet((3, 4, 6, 3), 64, 1000, seed=0)
    model.load_state_dict(torch.load(resnet_path, map_location="cpu", weights_only=True))
    self.model = model.to(self.dev, self.dtype).eval()

  def run(self, sources, prompts, seed: int = 0):
    """(last iteration's images NCHW, scores [K, B]) of one batch."""
    torch = self.torch
    x = common.nchw(sources).to(self.dev, self.dtype)
    b, _, h, w = x.shape
    gen = torch.Generator(device=self.dev).manual_seed(seed)
    with torch.no_grad():
      z_in = self.pipe.vae.encode(x).latent_dist.sample(gen) * self.pipe.vae.config.scaling_factor
      eps = torch.randn(z_in.shape, generator=gen, device=self.dev, dtype=self.dtype)
    masked_pixels = torch.zeros(b, 3, h, w, device=self.dev, dtype=self.dtype)  # encoded by the pipeline
    rows = self.loop(self.pipe, self.model, z_in, eps, masked_pixels, prompts, FLAGS.iterations, FLAGS.step_size,
                     FLAGS.target, steps=FLAGS.steps, strength=FLAGS.strength, guidance=FLAGS.guidance)
    common.sync(self.dev)
    return rows[-1]["images"].float().cpu().numpy(), torch.stack([r["scores"] for r in rows]).float().cpu().numpy()


def build(root: str, sd2: bool = False):
  """(pipeline folder, image size, ResNet-50 path): random models saved for both sides."""
  folder, image = common.make_torch_pipeline(root, sd2=sd2)
  resnet_path = os.path.join(root, "resnet50.pth")
  common.random_resnet50(resnet_path)
  return folder, image, resnet_path


def main(argv):
  """One batch in this (fresh) process: loading, then the run; prints the breakdown as JSON."""
  del argv
  start = time.perf_counter()
  sources, prompts = common.synthesis_inputs(FLAGS.batch, common.image_size())
  official = Official(FLAGS.folder, FLAGS.resnet)
  loaded = time.perf_counter()
  official.run(sources, prompts)
  print(json.dumps({"load_s": loaded - start, "args_s": 0.0, "run_s": time.perf_counter() - loaded}))


if __name__ == "__main__":
  app.run(main)

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
process, timed, its breakdown printed as JSON. Its flags are defined under `__main__`, so that importing
`Official` defines none.
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch's OpenMP starts: before any import of it
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (puts the repository root on sys.path)
import timing  # noqa: E402
import torch_pipeline as tp  # noqa: E402

from absl import app, flags  # noqa: E402


class Official:
  """The official procedure on a saved pipeline folder and ResNet-50 state dict, in torch dtype `dtype`."""

  def __init__(self, folder: str, resnet_path: str, proc: common.Procedure, dtype: str = "float32"):
    import torch
    from synood_jax.testing.torch_reference import official_loop, random_resnet  # pylint: disable=import-outside-toplevel
    self.torch, self.loop, self.proc = torch, official_loop, proc
    self.dev, self.dtype = tp.torch_device(), tp.torch_dtype(dtype)
    self.pipe = tp.load_torch_pipeline(folder, dtype)
    model = random_resnet((3, 4, 6, 3), 64, 1000, seed=0)
    model.load_state_dict(torch.load(resnet_path, map_location="cpu", weights_only=True))
    self.model = model.to(self.dev, self.dtype).eval()

  def run(self, sources, prompts, seed: int = 0):
    """(last iteration's images NCHW, scores [K, B]) of one batch."""
    torch, p = self.torch, self.proc
    x = tp.nchw(sources).to(self.dev, self.dtype)
    b, _, h, w = x.shape
    gen = torch.Generator(device=self.dev).manual_seed(seed)
    with torch.no_grad():
      z_in = self.pipe.vae.encode(x).latent_dist.sample(gen) * self.pipe.vae.config.scaling_factor
      eps = torch.randn(z_in.shape, generator=gen, device=self.dev, dtype=self.dtype)
    masked_pixels = torch.zeros(b, 3, h, w, device=self.dev, dtype=self.dtype)  # encoded by the pipeline
    rows = self.loop(self.pipe, self.model, z_in, eps, masked_pixels, prompts, p.iterations, p.step_size,
                     p.target, steps=p.steps, strength=p.strength, guidance=p.guidance)
    tp.sync(self.dev)
    return rows[-1]["images"].float().cpu().numpy(), torch.stack([r["scores"] for r in rows]).float().cpu().numpy()


def main(argv):
  """One batch in this (fresh) process: loading, then the run; prints the breakdown as JSON."""
  del argv
  f = flags.FLAGS
  proc = common.procedure()
  sources, prompts = common.synthesis_inputs(proc.batch, f.image)
  loaded = timing.timed(lambda: Official(f.folder, f.resnet, proc, f.torch_dtype))
  ran = timing.timed(lambda: loaded.result.run(sources, prompts))
  print(json.dumps({"load_s": loaded.seconds, "args_s": 0.0, "run_s": ran.seconds}))


if __name__ == "__main__":
  common.define_procedure_flags()
  flags.DEFINE_string("folder", "", "the pipeline folder")
  flags.DEFINE_string("resnet", "", "the ResNet-50 state dict")
  flags.DEFINE_integer("image", 64, "pixels per side of the source images")
  flags.DEFINE_enum("torch_dtype", "float32", tp.TORCH_DTYPES, "diffusers' and the ResNet's dtype")
  app.run(main)

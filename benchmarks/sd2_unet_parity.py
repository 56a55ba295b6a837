"""Our UNet against diffusers' at SD-2 in-painting's full size, once per CPU attention kernel.

A random SD-2-in-painting UNet (865M parameters, its config from `torch_pipeline.SD2_INPAINT_UNET`,
weights perturbed so that every path carries signal) is saved with `save_pretrained` and loaded by
`unet.load` as a user's folder is. One guided-batch forward at 64x64 latents (4096 tokens at the first
level, the shapes the CPU kernels differ on) is compared with diffusers' in float32:
max |ours - torch| / max |torch|. Not a timed test: it takes 3-5 minutes and about 10 GiB of memory.

  python benchmarks/sd2_unet_parity.py
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402,F401  (puts the repository root on sys.path)
import torch_pipeline as tp  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from synood_jax.models import unet  # noqa: E402

flags.DEFINE_integer("batch", 2, "UNet rows (a guided call of one image has 2)")
flags.DEFINE_list("kernels", ["xla", "xla_loop"], "our attention kernels to compare")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import diffusers
  import torch

  torch.manual_seed(0)
  model = tp.perturbed(diffusers.UNet2DConditionModel(**tp.SD2_INPAINT_UNET), 1)
  folder = os.path.join(tempfile.mkdtemp(prefix="sd2_unet_"), "unet")
  model.save_pretrained(folder)
  rng = np.random.default_rng(0)
  b = FLAGS.batch
  x = rng.standard_normal((b, 64, 64, 9)).astype(np.float32)
  ctx = rng.standard_normal((b, 77, 1024)).astype(np.float32)
  t = np.array([500, 300][:b] + [500] * max(0, b - 2), np.int64)
  with torch.no_grad():
    ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                torch.from_numpy(ctx)).sample.numpy().transpose(0, 2, 3, 1)
  del model
  scale = float(np.abs(ref).max())
  print(f"sd2_unet_parity: SD-2 in-painting UNet, batch {b}, 64x64 latents, float32; torch scale {scale:.3g}")
  for kernel in FLAGS.kernels:
    module, params = unet.load(folder, jnp.float32, attention=kernel)
    start = time.perf_counter()
    out = np.asarray(jax.jit(lambda p, *a: module.apply({"params": p}, *a))(
        params, jnp.asarray(x), jnp.asarray(t.astype(np.int32)), jnp.asarray(ctx)))
    err = float(np.abs(out - ref).max()) / scale
    print(f"  attention={kernel:9s} max |ours - diffusers| / max |diffusers| = {err:.2e}  "
          f"({time.perf_counter() - start:.0f} s incl. compile)", flush=True)
    del params


if __name__ == "__main__":
  app.run(main)

"""GroupNorm statistics: one reduce over (H, W, C/G) vs the two-stage `group_mean` we use, vs torch.

Prints, for SD-sized activations, the max error of the normalized output against float64 numpy (on a
random input and on a per-channel-constant input, which is what the first GroupNorm of the all-zero
masked image sees) and the time per call of each jitted variant and of torch's F.group_norm, interleaved
in one run; then the whole tiny VAE encode (all-zero 32px image) and a tiny UNet call with each variant.

  OMP_WAIT_POLICY=PASSIVE python benchmarks/group_norm.py --repeats=20
"""
from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch threads spin-wait otherwise (see dependencies.md)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402,F401  (puts the repository root on sys.path)
import timing  # noqa: E402
import torch_pipeline as tp  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from synood_jax.models import diffusion_layers  # noqa: E402

flags.DEFINE_integer("repeats", 2, "warm timed calls per variant (median reported)")
FLAGS = flags.FLAGS

SHAPES = ((2, 64, 64, 320, 32), (2, 32, 32, 640, 32), (1, 256, 256, 128, 32), (1, 128, 128, 256, 32))


def one_stage_mean(x):
  """The previous statistics: one reduce over every axis but batch and group."""
  axes = tuple(range(1, x.ndim - 2)) + (x.ndim - 1,)
  return x.mean(axes, keepdims=True)


def normalize(mean_fn, x, groups, eps=1e-6):
  xf = x.reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
  mean = mean_fn(xf)
  var = mean_fn(jnp.square(xf - mean))
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)


def reference(x, groups, eps=1e-6):
  xd = x.astype(np.float64).reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
  axes = tuple(range(1, xd.ndim - 2)) + (xd.ndim - 1,)
  m = xd.mean(axes, keepdims=True)
  v = np.square(xd - m).mean(axes, keepdims=True)
  return ((xd - m) / np.sqrt(v + eps)).reshape(x.shape)


def block(x):
  return jax.block_until_ready(x)


def group_norm_table():
  import torch
  fns = {"one-stage": jax.jit(lambda x, g: normalize(one_stage_mean, x, g), static_argnums=1),
         "two-stage": jax.jit(lambda x, g: normalize(diffusion_layers.group_mean, x, g), static_argnums=1)}
  rng = np.random.default_rng(0)
  print(f"{'shape (B,H,W,C) groups':34s} {'variant':10s} {'err random':>11s} {'err const':>10s} {'ms/call':>8s}")
  for b, h, w, c, g in SHAPES:
    rand = (rng.normal(size=(b, h, w, c)) * 2 + 1).astype(np.float32)
    const = np.broadcast_to((rng.normal(size=c) * 0.3 + 0.1).astype(np.float32), (b, h, w, c)).copy()
    refs = (reference(rand, g), reference(const, g))
    t_rand = torch.from_numpy(np.ascontiguousarray(rand.transpose(0, 3, 1, 2)))
    t_const = torch.from_numpy(np.ascontiguousarray(const.transpose(0, 3, 1, 2)))
    sides = {k: (lambda f=f: f(rand, g), block) for k, f in fns.items()}
    sides["torch"] = (lambda: torch.nn.functional.group_norm(t_rand, g, eps=1e-6), None)
    res = timing.interleaved(sides, FLAGS.repeats)
    for name, runs in res.items():
      if name == "torch":
        outs = [torch.nn.functional.group_norm(t, g, eps=1e-6).numpy().transpose(0, 2, 3, 1)
                for t in (t_rand, t_const)]
      else:
        outs = [np.asarray(fns[name](x, g)) for x in (rand, const)]
      errs = [np.abs(o - r).max() for o, r in zip(outs, refs)]
      print(f"{str((b, h, w, c)) + ' ' + str(g):34s} {name:10s} {errs[0]:11.2e} {errs[1]:10.2e} "
            f"{runs.median * 1e3:8.2f}")


def model_table():
  """The tiny VAE encode of an all-zero image (error against diffusers in float64) and a tiny UNet call
  (32px latents), with each variant swapped into `diffusion_layers.group_mean`."""
  import diffusers
  import torch

  from synood_jax.models import unet, vae
  folder = os.path.join(tempfile.mkdtemp(), "vae")
  torch.manual_seed(5)
  public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}
  model = tp.perturbed(diffusers.AutoencoderKL(**public(vae.TINY_VAE_CONFIG)), 5)
  model.save_pretrained(folder)
  vmod, vparams = vae.load(folder)
  zeros = np.zeros((4, 32, 32, 3), np.float32)
  with torch.no_grad():
    ref = model.double().encode(torch.zeros(4, 3, 32, 32, dtype=torch.float64)).latent_dist.mean
  ref = ref.numpy().transpose(0, 2, 3, 1)
  ucfg = tp.unet_config([32, 64, 128], 1, 8, 64, 32)  # the in-painting benchmark's UNet
  umod = unet.build(ucfg)
  uparams = unet.init_params(ucfg, jax.random.key(0))
  rng = np.random.default_rng(1)
  x, ctx = rng.normal(size=(2, 32, 32, 9)).astype(np.float32), rng.normal(size=(2, 77, 64)).astype(np.float32)
  t = jnp.array([500, 500])
  original = diffusion_layers.group_mean
  sides = {}
  for name, fn in (("one-stage", one_stage_mean), ("two-stage", original)):
    diffusion_layers.group_mean = fn  # read at trace time: trace (first call) while it is swapped in
    enc = jax.jit(lambda p, x: vmod.apply({"params": p}, x, method=vmod.encode)[0])
    call = jax.jit(lambda p, x, c: umod.apply({"params": p}, x, t, c))
    block(enc(vparams, zeros)), block(call(uparams, x, ctx))
    sides[f"vae {name}"] = (lambda enc=enc: enc(vparams, zeros), block)
    sides[f"unet {name}"] = (lambda call=call: call(uparams, x, ctx), block)
  diffusion_layers.group_mean = original
  res = timing.interleaved(sides, FLAGS.repeats)
  print(f"\n{'model':34s} {'variant':10s} {'rel err f64':>11s} {'ms/call':>8s}")
  for name in ("one-stage", "two-stage"):
    err = np.abs(np.asarray(res[f"vae {name}"].result) - ref).max() / np.abs(ref).max()
    print(f"{'tiny VAE encode, zeros, 4x32px':34s} {name:10s} {err:11.2e} {res[f'vae {name}'].median * 1e3:8.2f}")
  for name in ("one-stage", "two-stage"):
    print(f"{'UNet (32,64,128), 2x32x32 latents':34s} {name:10s} {'':11s} {res[f'unet {name}'].median * 1e3:8.2f}")


def main(_):
  print(f"JAX {jax.__version__} on {jax.devices()[0].platform}; load average {timing.load_average():.2f}")
  group_norm_table()
  model_table()
  print(f"load average {timing.load_average():.2f}")


if __name__ == "__main__":
  app.run(main)

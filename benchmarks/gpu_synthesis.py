"""The prepared GPU run: SynOOD synthesis at SD-2 in-painting's full size, official procedure vs ours.

Builds a random full-size SD-2 in-painting pipeline (diffusers, configs in common.py) and a random
ResNet-50 on the machine, then at 512 px, batch 8, K = 3 (20 steps x 0.6, guidance 8, r = 10, m = -5):
  - the official procedure in PyTorch (official_synthesis.Official) in float32 and float16;
  - ours (synthesize.BatchProgram) with float32 and bfloat16 networks (latents, scheduler, loss fp32);
and prints images/s for each, the ratios, our compile times, and our achieved FLOP/s against the chip's
dense bf16 peak (H200: 989 TFLOP/s). FLOPs come from XLA's cost analysis of each piece compiled on its
own (one guided UNet call, one refinement gradient, the final decode + classifier, the encoders), times
how often the program runs it: XLA counts a loop body once, so the whole program's count would miss the
sampler's steps. The UNet's own share is timed apart (one guided call, warm).

  python benchmarks/gpu_synthesis.py               # one H200: about 5-8 minutes
  python benchmarks/gpu_synthesis.py --tiny        # end to end on a CPU at the tiny preset (bfloat16 torch)
"""
from __future__ import annotations

import functools
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU in this process
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import FLAGS  # noqa: E402
import synthesis_vs_reference as bench  # noqa: E402  (defines the refinement flags)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from synood_jax.diffusion import inpaint, schedulers  # noqa: E402
from synood_jax.synthesis import refinement, synthesize as synthesis  # noqa: E402

flags.DEFINE_bool("tiny", False, "run at the tiny preset (a CPU check that the script works end to end)")
flags.DEFINE_float("peak_tflops", 989.0, "the chip's dense bf16 peak (H200 SXM: 989)")


def _flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def _timed(fn, *args, repeats: int = 3) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def program_flops(ours: "bench.Ours", sources, prompts, ids, counted: dict | None = None) -> dict:
  """FLOPs of one batch of our program, piece by piece (or those already `counted` for another dtype: the
  count does not depend on it), and the UNet call's own time."""
  pipe, params, B = ours.pipe, ours.params, sources.shape[0]
  args = ours.args(sources, prompts, ids)
  _, images, ids_a, prompt_ids, negative_ids, masked, first, guidance, hyper, seed = args
  kept = len(schedulers.get_timesteps(pipe.scheduler, FLAGS.steps, FLAGS.strength)[0])
  K = ours.cfg.iterations
  z_in, _ = jax.jit(functools.partial(synthesis.draw_inputs, pipe))(params["vae"], images, ids_a, seed)
  cond = pipe.text_hidden(params["text"], prompt_ids)
  context = jnp.concatenate([jnp.broadcast_to(pipe.text_hidden(params["text"], negative_ids), cond.shape), cond])
  extra = jnp.concatenate([jnp.ones(z_in.shape[:-1] + (1,)), jnp.broadcast_to(masked, z_in.shape)], -1)

  def unet_call(p, x, ctx, ex):
    return inpaint._guided_noise(pipe.unet, p, x, 500, ctx, ex, 8.0)  # pylint: disable=protected-access

  def decode_classify(p, u):
    return ours.logits_fn(p["classifier"], inpaint.decode_unscaled(pipe.vae_decode, p["vae"], u))

  def gradient(p, u):
    return refinement.skip_gradient(ours.cfg, hyper, lambda q, v: inpaint.decode_unscaled(pipe.vae_decode, q["vae"], v),
                                    lambda q, x: ours.logits_fn(q["classifier"], x), p, u)

  def encoders(p, images, ids, prompt_ids, negative_ids, seed):
    z, _ = synthesis.draw_inputs(pipe, p["vae"], images, ids, seed)
    return z, pipe.text_hidden(p["text"], prompt_ids), pipe.text_hidden(p["text"], negative_ids)

  u = z_in / pipe.scaling_factor
  if counted is None:
    pieces = {"unet": _flops(unet_call, params["unet"], z_in, context, extra),
              "gradient": _flops(gradient, params, u), "final": _flops(decode_classify, params, u),
              "encoders": _flops(encoders, params, images, ids_a, prompt_ids, negative_ids, seed)}
    total = pieces["unet"] * kept * K + pieces["gradient"] * (K - 1) + pieces["final"] + pieces["encoders"]
    counted = dict(pieces, total=total, unet_calls=kept * K)
  unet_s = _timed(jax.jit(unet_call), params["unet"], z_in, context, extra)
  return dict(counted, unet_s=unet_s)


def main(argv):
  del argv
  if FLAGS.tiny:
    FLAGS.preset = "tiny"
    common.apply_preset()
  else:
    FLAGS.batch = 8 if not FLAGS["batch"].present else FLAGS.batch
  import torch
  cuda = torch.cuda.is_available()
  low = "float16" if cuda else "bfloat16"  # CPU torch has no float16 convolutions
  tmp = tempfile.mkdtemp(prefix="gpu_synthesis_")
  start = time.perf_counter()
  folder, image, resnet_path = bench.build(tmp, sd2=not FLAGS.tiny)
  print(f"gpu_synthesis: built {'the tiny' if FLAGS.tiny else 'a random full-size SD-2 in-painting'} pipeline "
        f"and ResNet-50 in {time.perf_counter() - start:.0f} s; {image} px, batch {FLAGS.batch}, K={FLAGS.iterations}")
  print("\n".join(common.device_lines()))
  sources, prompts, ids = bench.batch_inputs(FLAGS.batch, image)
  B, peak = FLAGS.batch, FLAGS.peak_tflops * 1e12
  rows, counted = [], None
  for dtype in ("float32", low):
    FLAGS.torch_dtype = dtype
    official = bench.Official(folder, resnet_path)
    first = common.timed(lambda: official.run(sources, prompts))[1]
    warm = float(np.median([common.timed(lambda: official.run(sources, prompts))[1]
                            for _ in range(FLAGS.repeats)]))
    rows.append((f"official (torch {dtype})", warm, None, first))
    del official
    if cuda:
      torch.cuda.empty_cache()
  for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
    ours = bench.Ours(folder, resnet_path, dtype=dtype, iterations=FLAGS.iterations)
    compile_s = ours.compile(sources, prompts, ids)["total_s"]
    warm = float(np.median([common.timed(lambda: ours.run(sources, prompts, ids))[1]
                            for _ in range(FLAGS.repeats + 1)]))
    flops = counted = program_flops(ours, sources, prompts, ids, counted)
    rows.append((f"ours ({name} networks)", warm, flops, compile_s))
    del ours
  print(f"  {'':34s} {'s / batch':>10s} {'images/s':>9s}   notes")
  for name, warm, flops, extra in rows:
    note = (f"first call {extra:.1f} s" if flops is None else
            f"compile {extra:.1f} s; {flops['total'] / 1e12:.2f} TFLOP per batch -> {flops['total'] / warm / 1e12:.1f} "
            f"TFLOP/s = {100 * flops['total'] / warm / peak:.2f}% of peak; UNet call {flops['unet'] / 1e12:.3f} TFLOP "
            f"in {flops['unet_s'] * 1e3:.1f} ms = {100 * flops['unet'] / flops['unet_s'] / peak:.2f}% of peak "
            f"(x{flops['unet_calls']} per batch)")
    print(f"  {name:34s} {warm:10.3f} {B / warm:9.3f}   {note}")
  t = {r[0]: r[1] for r in rows}
  print(f"  ours fp32 / official fp32:     {t['official (torch float32)'] / t['ours (float32 networks)']:.2f}x")
  print(f"  ours bf16 / official {low}:  {t[f'official (torch {low})'] / t['ours (bfloat16 networks)']:.2f}x")
  print(f"  ours bf16 / official fp32:     {t['official (torch float32)'] / t['ours (bfloat16 networks)']:.2f}x")
  print(f"  peak used for the shares: {FLAGS.peak_tflops:.0f} TFLOP/s (dense bf16)"
        + ("; on a CPU the shares mean nothing" if not cuda else ""))


if __name__ == "__main__":
  app.run(main)

"""Our jitted in-painting sampler vs diffusers' PyTorch StableDiffusionInpaintPipeline, same run.

Both sides: the same random SD-2-in-painting-shaped pipeline (built in PyTorch, `save_pretrained` to a
temp folder, loaded by ours with `inpaint_pipeline.load_inpaint_pipeline`), the same batch, prompts, starting
latents z_t = add_noise(z_in, eps, t0), full mask, 4-channel `masked_image_latents` given (so neither side
VAE-encodes anything), PNDM, `--steps` 20 at strength 0.6 (12 UNet steps), guidance 8,
output_type='latent'. Timed per call: prompt encoding + the guided denoising loop (+ the VAE decode with
--decode). Our first call includes XLA compilation; it is reported apart from the warm median.

  python benchmarks/inpaint_vs_diffusers.py                       # ~2 min on an idle 2-core CPU
  python benchmarks/inpaint_vs_diffusers.py --unet_channels=128,256,512 --latent_size=64 --batch=16 \
      --repeats=10 --dtype=bfloat16 --torch_dtype=float16         # a GPU
  python benchmarks/inpaint_vs_diffusers.py --pipeline=/path/to/stable-diffusion-2-inpainting --latent_size=64

The outputs are compared in the same run (max |ours - diffusers| over the latents).
"""
from __future__ import annotations

import functools
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (also puts the repository root on sys.path)
import timing  # noqa: E402
import torch_pipeline as tp  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from synood_jax.diffusion import inpaint, inpaint_pipeline, schedulers  # noqa: E402

common.define_model_flags()
common.define_procedure_flags(refinement=False)
flags.DEFINE_integer("repeats", 2, "warm timed calls per side (median reported)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "our networks' dtype (latents, scheduler stay fp32)")
flags.DEFINE_enum("torch_dtype", "float32", tp.TORCH_DTYPES, "diffusers' dtype (float16/bfloat16 are for a GPU)")
flags.DEFINE_bool("decode", False, "also VAE-decode the latents to images on both sides (output_type='pt')")
FLAGS = flags.FLAGS


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _ours(pipe, steps, decode, params, z_t, ids, neg_ids, masked, first_index, guidance):
  """Prompt encoding + the guided loop (+ decode), as the jitted sampler is used in synthesis."""
  cond = pipe.text_hidden(params["text"], ids)
  uncond = jnp.broadcast_to(pipe.text_hidden(params["text"], neg_ids), cond.shape)
  mask = jnp.ones(z_t.shape[:-1] + (1,), jnp.float32)
  z0 = inpaint.sample_latents(pipe.unet, pipe.scheduler, params["unet"], z_t, cond, uncond, mask, masked,
                              guidance, steps, first_index)
  if decode:
    return inpaint.decode_images(pipe.vae_decode, params["vae"], z0, pipe.scaling_factor)
  return z0


def main(argv):
  del argv
  import torch

  sizes, proc = common.model_sizes(), common.procedure()
  tmp = tempfile.mkdtemp(prefix="inpaint_bench_")
  folder, image = tp.make_torch_pipeline(tmp, sizes)
  B, L, steps = proc.batch, sizes.latent_size, proc.steps
  dev = tp.torch_device()
  tpipe = tp.load_torch_pipeline(folder, FLAGS.torch_dtype)
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[FLAGS.dtype]
  pipe, params = inpaint_pipeline.load_inpaint_pipeline(folder, dtype=dtype)
  params = jax.device_put(params)

  text = common.prompts(B)
  rng = np.random.default_rng(0)
  z_in = rng.standard_normal((B, L, L, 4)).astype(np.float32)
  eps = rng.standard_normal((B, L, L, 4)).astype(np.float32)
  masked = (0.5 * rng.standard_normal((B, L, L, 4))).astype(np.float32)

  # The common starting latents, from diffusers' own scheduler (both sides then start identically).
  tpipe.scheduler.set_timesteps(steps)
  ts, _ = tpipe.get_timesteps(steps, proc.strength, "cpu")
  z_t = tpipe.scheduler.add_noise(tp.nchw(z_in), tp.nchw(eps), ts[:1].repeat(B))
  ours_z_t = schedulers.add_noise(pipe.scheduler, jnp.asarray(z_in), jnp.asarray(eps),
                                  jnp.full((B,), int(ts[0])))
  zt_diff = float(np.abs(np.asarray(ours_z_t) - tp.nhwc(z_t)).max())

  tdt = tp.torch_dtype(FLAGS.torch_dtype)
  t_args = dict(prompt=text, image=torch.zeros(B, 3, image, image, device=dev, dtype=tdt),
                mask_image=torch.ones(B, 1, image, image, device=dev, dtype=tdt),
                masked_image_latents=tp.nchw(masked).to(dev, tdt), latents=z_t.to(dev, tdt),
                strength=proc.strength, num_inference_steps=steps, guidance_scale=proc.guidance,
                output_type="pt" if FLAGS.decode else "latent", height=image, width=image)

  def run_torch():
    with torch.no_grad():
      return tpipe(**t_args).images

  ids, neg = jnp.asarray(pipe.tokenize(text)), jnp.asarray(pipe.tokenize([""]))
  first = jnp.int32(inpaint.start_index(pipe.scheduler, steps, proc.strength))
  args = (params, jnp.asarray(z_t.numpy().transpose(0, 2, 3, 1)), ids, neg, jnp.asarray(masked), first,
          jnp.float32(proc.guidance))

  def run_ours():
    return _ours(pipe, steps, FLAGS.decode, *args)

  res = timing.interleaved({"diffusers": (run_torch, lambda _: tp.sync(dev)),
                            "ours": (run_ours, jax.block_until_ready)}, FLAGS.repeats)
  theirs, mine = res["diffusers"], res["ours"]

  ref = tp.nhwc(theirs.result)
  got = np.asarray(mine.result, np.float32)
  err = float(np.abs(got - ref).max())
  kept = len(ts)
  what = "images" if FLAGS.decode else "latents"

  print(f"inpaint_vs_diffusers: {common.config_line(sizes, image)}")
  print(f"  batch {B}, {steps} steps x strength {proc.strength} = {kept} scheduler steps "
        f"(CFG: UNet batch {2 * B}), guidance {proc.guidance}, output {what}; ours {FLAGS.dtype}")
  print("\n".join(common.device_lines(FLAGS.torch_dtype)))
  print(f"  {'':12s} {'first call s':>13s} {'warm median s':>14s} {'images/s':>10s}   warm runs")
  for name, runs in res.items():
    print(f"  {name:12s} {runs.first.seconds:13.3f} {runs.median:14.3f} {B / runs.median:10.2f}   "
          + " ".join(f"{t.seconds:.3f}" for t in runs.warm))
  print(f"  our compile time (first call - warm median): {mine.first.seconds - mine.median:.2f} s")
  print(f"  ratio ours/diffusers (images/s, warm):       {theirs.median / mine.median:.2f} x")
  total = lambda runs: sum(t.seconds for t in runs.all)  # noqa: E731
  print(f"  ratio incl. our compile, over {FLAGS.repeats + 1} calls:      {total(theirs) / total(mine):.2f} x")
  print(f"  max |ours - diffusers| {what}: {err:.2e} (scale {np.abs(ref).max():.2f}); "
        f"start latents z_t: {zt_diff:.1e}")
  timings = theirs.all + mine.all
  print(f"  1-minute load average during the timings: {min(t.load for t in timings):.2f} - "
        f"{max(t.load for t in timings):.2f}; other processes' cores: {max(t.other for t in timings):.2f} at most")
  warning = timing.load_warning(timings)
  if warning:
    print(warning)


if __name__ == "__main__":
  app.run(main)

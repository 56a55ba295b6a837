"""Our jitted in-painting sampler vs diffusers' PyTorch StableDiffusionInpaintPipeline, same run.

Both sides: the same random SD-2-in-painting-shaped pipeline (built in PyTorch, `save_pretrained` to a
temp folder, loaded by ours with `pipeline.load_inpaint_pipeline`), the same batch, prompts, starting
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
from common import FLAGS  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from synood_jax.diffusion import inpaint, pipeline, schedulers  # noqa: E402

flags.DEFINE_bool("decode", False, "also VAE-decode the latents to images on both sides (output_type='pt')")


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

  tmp = tempfile.mkdtemp(prefix="inpaint_bench_")
  folder, image = common.make_torch_pipeline(tmp)
  B, L, steps = FLAGS.batch, FLAGS.latent_size, FLAGS.steps
  dev = common.torch_device()
  tpipe = common.load_torch_pipeline(folder)
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[FLAGS.dtype]
  pipe, params = pipeline.load_inpaint_pipeline(folder, dtype=dtype)
  params = jax.device_put(params)

  text = common.prompts(B)
  rng = np.random.default_rng(0)
  z_in = rng.standard_normal((B, L, L, 4)).astype(np.float32)
  eps = rng.standard_normal((B, L, L, 4)).astype(np.float32)
  masked = (0.5 * rng.standard_normal((B, L, L, 4))).astype(np.float32)

  # The common starting latents, from diffusers' own scheduler (both sides then start identically).
  tpipe.scheduler.set_timesteps(steps)
  ts, _ = tpipe.get_timesteps(steps, FLAGS.strength, "cpu")
  z_t = tpipe.scheduler.add_noise(common.nchw(z_in), common.nchw(eps), ts[:1].repeat(B))
  ours_z_t = schedulers.add_noise(pipe.scheduler, jnp.asarray(z_in), jnp.asarray(eps),
                                  jnp.full((B,), int(ts[0])))
  zt_diff = float(np.abs(np.asarray(ours_z_t) - common.nhwc(z_t)).max())

  tdt = common.torch_dtype()
  t_args = dict(prompt=text, image=torch.zeros(B, 3, image, image, device=dev, dtype=tdt),
                mask_image=torch.ones(B, 1, image, image, device=dev, dtype=tdt),
                masked_image_latents=common.nchw(masked).to(dev, tdt), latents=z_t.to(dev, tdt),
                strength=FLAGS.strength, num_inference_steps=steps, guidance_scale=FLAGS.guidance,
                output_type="pt" if FLAGS.decode else "latent", height=image, width=image)

  def run_torch():
    with torch.no_grad():
      return tpipe(**t_args).images

  ids, neg = jnp.asarray(pipe.tokenize(text)), jnp.asarray(pipe.tokenize([""]))
  first = jnp.int32(inpaint.start_index(pipe.scheduler, steps, FLAGS.strength))
  args = (params, jnp.asarray(z_t.numpy().transpose(0, 2, 3, 1)), ids, neg, jnp.asarray(masked), first,
          jnp.float32(FLAGS.guidance))

  def run_ours():
    return _ours(pipe, steps, FLAGS.decode, *args)

  res = common.first_and_warm({"diffusers": (run_torch, lambda _: common.sync(dev)),
                               "ours": (run_ours, jax.block_until_ready)}, FLAGS.repeats)
  t_out, t_first, t_warm, t_all, t_loads = res["diffusers"]
  o_out, o_first, o_warm, o_all, o_loads = res["ours"]

  ref = common.nhwc(t_out)
  got = np.asarray(o_out, np.float32)
  err = float(np.abs(got - ref).max())
  kept = len(ts)
  what = "images" if FLAGS.decode else "latents"

  print(f"inpaint_vs_diffusers: {common.config_line(image)}")
  print(f"  batch {B}, {steps} steps x strength {FLAGS.strength} = {kept} scheduler steps "
        f"(CFG: UNet batch {2 * B}), guidance {FLAGS.guidance}, output {what}; ours {FLAGS.dtype}")
  print("\n".join(common.device_lines()))
  print(f"  {'':12s} {'first call s':>13s} {'warm median s':>14s} {'images/s':>10s}   warm runs")
  for name, first_s, warm_s, all_s in (("diffusers", t_first, t_warm, t_all), ("ours", o_first, o_warm, o_all)):
    print(f"  {name:12s} {first_s:13.3f} {warm_s:14.3f} {B / warm_s:10.2f}   "
          + " ".join(f"{t:.3f}" for t in all_s))
  print(f"  our compile time (first call - warm median): {o_first - o_warm:.2f} s")
  print(f"  ratio ours/diffusers (images/s, warm):       {t_warm / o_warm:.2f} x")
  print(f"  ratio incl. our compile, over {FLAGS.repeats + 1} calls:      "
        f"{(t_first + sum(t_all)) / (o_first + sum(o_all)):.2f} x")
  print(f"  max |ours - diffusers| {what}: {err:.2e} (scale {np.abs(ref).max():.2f}); "
        f"start latents z_t: {zt_diff:.1e}")
  loads = [t_loads["first"], o_loads["first"], *t_loads["warm"], *o_loads["warm"]]
  print(f"  1-minute load average during the timings: {min(l for l, _ in loads):.2f} - "
        f"{max(l for l, _ in loads):.2f}; other processes' cores: {max(o for _, o in loads):.2f} at most")
  warning = common.load_warning([o for _, o in loads])
  if warning:
    print(warning)


if __name__ == "__main__":
  app.run(main)

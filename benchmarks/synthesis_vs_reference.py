"""SynOOD stage-1 synthesis: our jitted per-batch program vs the official PyTorch procedure, same run.

Reference (the official `generate_near_ood_sample.py` loop, on diffusers' StableDiffusionInpaintPipeline,
which agrees with the official modified pipeline given identical latents; see docs/notes): per batch,
VAE-encode the sources and *sample* the posterior, draw eps once; then K times:
  z_t = scheduler.add_noise(z_in, eps, t0)
  under no_grad: pipe(prompt=..., mask_image=ones, masked_image_latents=<all-zero image in PIXEL space>,
                      latents=z_t, strength, steps, guidance, output_type='latent')
     (so the pipeline re-encodes the prompts and VAE-encodes the constant masked image on every call)
  with grad: x = clamp(D(z0 / scale) / 2 + 0.5, 0, 1); g = classifier(x); s = mean(g) - logsumexp(g);
     L = mean((m - s)^2); L.backward() (as the official code: parameters keep requires_grad, so weight
     gradients are computed too); eps <- eps - r * dL/dz
  including the last update, which is never used. The saved images are the last decode.
Ours: `synthesis.synthesize_batch` under `jax.jit`, called exactly as `synthesis.synthesize` calls it
(host tokenization per batch, the masked-image latents computed once, outputs fetched to the host),
without the PNG/manifest writing.

Classifier on both sides: CLIP zero-shot over `--num_classes` class prompts from one random tiny CLIP
folder (`tiny.make_tiny_clip`): transformers' CLIPModel image tower in torch (bicubic antialiased
resize + centre crop + normalize in torch, differentiable), `guidance.clip_zero_shot` in ours. The class
text features are computed once (outside the timings) and shared.

  python benchmarks/synthesis_vs_reference.py                    # ~3 min on an idle 2-core CPU
  python benchmarks/synthesis_vs_reference.py --unet_channels=128,256,512 --latent_size=64 --batch=16 \
      --repeats=5 --dtype=bfloat16 --torch_dtype=float16         # a GPU
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

from synood_jax.synthesis import guidance, refinement, synthesize as synthesis
from synood_jax.models import zero_shot  # noqa: E402
from synood_jax.diffusion import inpaint, pipeline, schedulers  # noqa: E402
from synood_jax.models import clip
from synood_jax.demo import tiny_clip as tiny  # noqa: E402

flags.DEFINE_integer("iterations", 3, "K refinement iterations")
flags.DEFINE_float("step_size", 10.0, "r")
flags.DEFINE_float("target", -5.0, "m")
flags.DEFINE_integer("num_classes", 16, "zero-shot classes of the guidance classifier")
flags.DEFINE_integer("clip_image_size", 64, "tiny CLIP input size (patch 8)")
flags.DEFINE_integer("clip_width", 64, "tiny CLIP vision width")


def _torch_reference(folder, clip_folder, text_features, image):
  """-> run(sources NCHW in [-1, 1], prompts, seed) -> images NCHW in [0, 1]: the official loop."""
  import torch
  import torch.nn.functional as F
  import transformers

  from synood_jax.models import clip_preprocess

  dev, dt = common.torch_device(), common.torch_dtype()
  pipe = common.load_torch_pipeline(folder)
  model = transformers.CLIPModel.from_pretrained(clip_folder).to(dev, dt).eval()
  text = torch.from_numpy(text_features).to(dev, dt)
  pre = clip_preprocess.load_config(clip_folder)
  mean = torch.tensor(pre.image_mean, device=dev, dtype=dt).view(1, 3, 1, 1)
  std = torch.tensor(pre.image_std, device=dev, dtype=dt).view(1, 3, 1, 1)
  scale = pipe.vae.config.scaling_factor
  steps, strength = FLAGS.steps, FLAGS.strength

  def classifier(x):
    h, w = x.shape[-2:]
    short = pre.shortest_edge
    size = (short, round(w * short / h)) if h <= w else (round(h * short / w), short)
    x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    top, left = (x.shape[-2] - pre.crop_height) // 2, (x.shape[-1] - pre.crop_width) // 2
    x = (x[..., top:top + pre.crop_height, left:left + pre.crop_width] - mean) / std
    f = model.visual_projection(model.vision_model(pixel_values=x).pooler_output)
    return 100.0 * F.normalize(f, dim=-1) @ text.T

  def run(sources, prompts, seed):
    gen = torch.Generator(device=dev).manual_seed(seed)
    b = sources.shape[0]
    mask = torch.ones(b, 1, image, image, device=dev, dtype=dt)
    with torch.no_grad():
      z_in = pipe.vae.encode(sources).latent_dist.sample(gen) * scale
      eps = torch.randn(z_in.shape, generator=gen, device=dev, dtype=dt)
      pipe.scheduler.set_timesteps(steps, device=dev)
      ts, _ = pipe.get_timesteps(steps, strength, dev)
    masked_pixels = sources * (mask < 0.5)       # all zeros, in pixel space: encoded by the pipeline
    for _ in range(FLAGS.iterations):
      z_t = pipe.scheduler.add_noise(z_in, eps, ts[:1])
      with torch.no_grad():
        z0 = pipe(prompt=prompts, image=sources, mask_image=mask, masked_image_latents=masked_pixels, latents=z_t,
                  guidance_scale=FLAGS.guidance, num_inference_steps=steps, strength=strength,
                  generator=gen, output_type="latent", height=image, width=image).images
        z = z0 / scale
      with torch.enable_grad():
        z.requires_grad_(True)
        x = (pipe.vae.decode(z, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)
        g = classifier(x)
        s = g.mean(1) - torch.logsumexp(g, dim=1)
        loss = torch.pow(FLAGS.target - s, 2).mean()
        loss.backward()
        eps = eps - z.grad * FLAGS.step_size
    return x.detach()

  return run


def main(argv):
  del argv
  import torch

  tmp = tempfile.mkdtemp(prefix="synthesis_bench_")
  folder, image = common.make_torch_pipeline(tmp)
  clip_folder = tiny.make_tiny_clip(
      os.path.join(tmp, "clip"), seed=0, vision_image_size=FLAGS.clip_image_size, vision_patch_size=8,
      vision_hidden_size=FLAGS.clip_width, vision_intermediate_size=4 * FLAGS.clip_width, projection_dim=32)
  B, steps = FLAGS.batch, FLAGS.steps
  dev = common.torch_device()

  # Ours, set up as synthesis.synthesize does.
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[FLAGS.dtype]
  pipe, params = pipeline.load_inpaint_pipeline(folder, dtype=dtype)
  bundle = clip.from_pretrained(clip_folder, dtype=dtype)
  classes = [f"class {chr(97 + i % 26)}{i}" for i in range(FLAGS.num_classes)]
  text_features = zero_shot.class_text_features(bundle, bundle.params, classes, ["a photo of a {}."])
  logits_fn, params["classifier"] = guidance.clip_zero_shot(bundle, text_features)
  params = jax.device_put(params)
  refine_cfg = refinement.RefineConfig(iterations=FLAGS.iterations, step_size=FLAGS.step_size,
                                       target=FLAGS.target, reference_batch=B)
  first_index = jnp.int32(inpaint.start_index(pipe.scheduler, steps, FLAGS.strength))
  negative_ids = jnp.asarray(pipe.tokenize([""]))
  masked = synthesis.masked_image_latents(pipe, params["vae"], image)
  step_fn = jax.jit(functools.partial(synthesis.synthesize_batch, pipe, refine_cfg, steps, None, logits_fn))

  rng = np.random.default_rng(0)
  sources = rng.uniform(-1, 1, (B, image, image, 3)).astype(np.float32)
  prompts = common.prompts(B)
  ids = np.array([synthesis.source_id(f"c/{i}.png") for i in range(B)], np.int32)

  def run_ours():
    prompt_ids = np.asarray(pipe.tokenize(prompts))
    out, scores, losses, _, _ = step_fn(params, sources, ids, prompt_ids, negative_ids, masked, first_index,
                                     jnp.float32(FLAGS.guidance), jnp.uint32(0))
    return jax.device_get((out, scores, losses))

  ref = _torch_reference(folder, clip_folder, text_features, image)
  t_sources = common.nchw(sources).to(dev, common.torch_dtype())

  def run_torch():
    return ref(t_sources, prompts, 0)

  res = common.first_and_warm({"official (torch)": (run_torch, lambda _: common.sync(dev)),
                               "ours": (run_ours, None)}, FLAGS.repeats)
  t_out, t_first, t_warm, t_all = res["official (torch)"]
  (o_img, o_scores, _), o_first, o_warm, o_all = res["ours"]
  t_img = common.nhwc(t_out)

  kept = len(schedulers.get_timesteps(pipe.scheduler, steps, FLAGS.strength)[0])
  print(f"synthesis_vs_reference: {common.config_line(image)}; tiny CLIP {FLAGS.clip_image_size}px "
        f"width {FLAGS.clip_width}, {FLAGS.num_classes} classes")
  print(f"  batch {B}, K={FLAGS.iterations}, {steps} steps x strength {FLAGS.strength} ({kept} sampler "
        f"steps per iteration), guidance {FLAGS.guidance}, r={FLAGS.step_size}, m={FLAGS.target}; ours {FLAGS.dtype}")
  print("\n".join(common.device_lines()))
  print(f"  {'':18s} {'first call s':>13s} {'warm median s':>14s} {'images/s':>10s}   warm runs")
  for name, first_s, warm_s, all_s in (("official (torch)", t_first, t_warm, t_all), ("ours", o_first, o_warm, o_all)):
    print(f"  {name:18s} {first_s:13.3f} {warm_s:14.3f} {B / warm_s:10.3f}   " + " ".join(f"{t:.3f}" for t in all_s))
  print(f"  our compile time (first call - warm median): {o_first - o_warm:.2f} s")
  print(f"  ratio ours/official (images/s, warm):        {t_warm / o_warm:.2f} x   (target >= 2)")
  print(f"  ratio incl. our compile, over {FLAGS.repeats + 1} batches:     "
        f"{(t_first + sum(t_all)) / (o_first + sum(o_all)):.2f} x")
  ok = np.isfinite(o_img).all() and np.isfinite(t_img).all()
  print(f"  outputs finite: {ok}; shapes ours {o_img.shape} official {t_img.shape}; our scores per iteration "
        f"(image 0): {' '.join(f'{v:.3f}' for v in o_scores[:, 0])} (random posterior/noise differ between the two sides)")
  del torch


if __name__ == "__main__":
  app.run(main)

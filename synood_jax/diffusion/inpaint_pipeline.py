"""Load a diffusers Stable Diffusion (in-painting) folder as Flax modules + one param tree, and run it in
one jitted call.

Folder layout (diffusers' `save_pretrained`): model_index.json, unet/, vae/, text_encoder/, tokenizer/,
scheduler/. Weights from *.safetensors or *.bin, converted by our own converter.

    pipe, params = load_inpaint_pipeline("/models/stable-diffusion-2-inpainting")
    images = pipe(params, "a red barn", image=photo, mask_image=mask, strength=0.6, seed=0)

`pipe(...)` (`inpaint`) is diffusers' StableDiffusionInpaintPipeline.__call__ with its argument names and
conventions (images in [0, 1] or PIL, mask 1 = repaint, NHWC arrays):
  x = 2 image - 1; m = 1[mask >= 0.5]; c = E_text(prompt), u = E_text(negative_prompt or "");
  z_m = s * E_vae(x * (1 - m)); z_T = add_noise(s * E_vae(x), eps, t_start) (eps when strength = 1);
  z_0 = sampler(z_T, c, u, m, z_m) (inpaint.sample_latents); images = clip(D_vae(z_0 / s) / 2 + 0.5, 0, 1)
with s the VAE scaling factor. Its compiled programs live on the pipeline object (no module-level cache
keeps a pipeline alive); new prompts, images, seeds, guidance scales or strengths below 1 reuse them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from synood_jax import parallel
from synood_jax.diffusion import images as image_lib, inpaint as sampler, schedulers
from synood_jax.models import checkpoint_io, clip, diffusion_layers, unet as unet_lib, vae as vae_lib
from synood_jax.models.checkpoint_io import CheckpointError

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclasses.dataclass(frozen=True, eq=False)
class InpaintPipeline:
  """The static half of a pipeline (modules, scheduler, tokenizer); params travel separately.

  Calling it runs `inpaint(self, params, ...)`."""
  unet: Any
  vae: Any
  text: Any            # a CLIP bundle of the text tower, without params (they travel in params['text'])
  scheduler: Any
  scaling_factor: float
  folder: str
  sample_size: int = 64  # the UNet's config sample_size: default image side = sample_size * vae_scale
  _programs: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

  def __hash__(self):
    return id(self)

  @property
  def vae_scale_factor(self) -> int:
    """Image pixels per latent pixel (diffusers' 2 ** (len(vae block_out_channels) - 1))."""
    return 2 ** (len(self.vae.cfg.block_out_channels) - 1)

  def tokenize(self, texts) -> np.ndarray:
    return self.text.tokenize(list(texts))

  def text_hidden(self, text_params, ids):
    """Final-layer-normed last hidden states of the text encoder (what diffusers conditions on)."""
    return self.text.text_hidden_states(text_params, ids)

  def vae_encode(self, vae_params, images):
    return self.vae.apply({"params": vae_params}, images, method=self.vae.encode)

  def vae_decode(self, vae_params, latents):
    return self.vae.apply({"params": vae_params}, latents, method=self.vae.decode)

  def __call__(self, params, prompt, image, mask_image, negative_prompt=None, **kwargs):
    return inpaint(self, params, prompt, image, mask_image, negative_prompt, **kwargs)


def load_inpaint_pipeline(folder: str, dtype=jnp.float32, scheduler: str | None = None,
                          scheduler_overrides: dict | None = None, attention: str = "auto"):
  """-> (InpaintPipeline, params {'unet', 'vae', 'text'}).

  `scheduler` overrides the folder's class ('ddim', 'pndm', 'dpmsolver_multistep' or a diffusers class
  name), read from the folder's scheduler_config.json like diffusers' `OtherScheduler.from_config`;
  `scheduler_overrides` replaces config fields ({'timestep_spacing': 'trailing'}). As
  StableDiffusionInpaintPipeline does, `steps_offset` becomes 1 and PNDM's `skip_prk_steps` True
  (see `schedulers.inpaint_pipeline_scheduler`). `attention` names the attention kernel of all three
  networks (models/attention.py: 'auto' picks per backend)."""
  if not os.path.isfile(os.path.join(folder, "model_index.json")):
    raise CheckpointError(f"{folder}: no model_index.json: not a diffusers pipeline folder")
  for sub in SUBFOLDERS:
    if not os.path.isdir(os.path.join(folder, sub)):
      raise CheckpointError(f"{folder}: missing subfolder {sub!r} (a diffusers pipeline has {SUBFOLDERS})")
  sched_cfg = schedulers.load_scheduler_config(os.path.join(folder, "scheduler"))
  sched = schedulers.inpaint_pipeline_scheduler(sched_cfg, scheduler, **(scheduler_overrides or {}))
  unet_module, unet_params = unet_lib.load(os.path.join(folder, "unet"), dtype=dtype,
                                                      attention=attention)
  vae_module, vae_params = vae_lib.load(os.path.join(folder, "vae"), dtype=dtype, attention=attention)
  text = clip.from_pretrained(os.path.join(folder, "text_encoder"), dtype=dtype,
                              tokenizer_path=os.path.join(folder, "tokenizer"), attention=attention)
  sample_size = checkpoint_io.read_config(os.path.join(folder, "unet")).get("sample_size", 64)
  if isinstance(sample_size, (list, tuple)):
    sample_size = sample_size[0]
  # The bundle keeps no params of its own: once the caller shards params['text'], no unsharded copy
  # stays alive beside them.
  text, text_params = dataclasses.replace(text, params=None), text.params
  pipe = InpaintPipeline(unet=unet_module, vae=vae_module, text=text, scheduler=sched,
                         scaling_factor=float(vae_module.cfg.scaling_factor), folder=folder,
                         sample_size=int(sample_size))
  return pipe, {"unet": unet_params, "vae": vae_params, "text": text_params}


# ---------------------------------------------------------------------------------------------------
# The one call.

def _start_latents(scheduler, num_inference_steps: int, first_index, strength_max: bool, given,
                   image_latents, shape, key):
  """diffusers' prepare_latents -> (z_T, noise): `given` latents as they are (they are the noise too),
  else noise ~ N(0, I) at strength 1, else add_noise(image latents, noise, t_start)."""
  if given is not None:
    given = given.astype(jnp.float32)
    return given, given
  noise = jax.random.normal(key, shape, jnp.float32)
  if strength_max:
    return noise, noise
  t0 = jnp.asarray(sampler.timestep_table(scheduler, num_inference_steps))[first_index]
  return schedulers.add_noise(scheduler, image_latents, noise, jnp.full((shape[0],), t0)), noise


def _program(pipe: InpaintPipeline, params, batch, first_index, guidance_scale, seed, *, scheduler,
             num_inference_steps: int, cfg: bool, strength_max: bool, sample_posterior: bool):
  """The jitted body. batch: ids, negative_ids (cfg only), image [B,H,W,3] in [-1,1], mask [B,H,W,1],
  and optionally latents / masked_image_latents (scaled, NHWC at latent size)."""
  k_noise, k_image, k_masked = jax.random.split(jax.random.key(seed), 3)

  def encode(x, key):  # diffusers' _encode_vae_image: a posterior sample (or its mean), scaled
    mean, logvar = pipe.vae_encode(params["vae"], x)
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    z = vae_lib.vae_sample(mean, logvar, key) if sample_posterior else mean
    return z * pipe.scaling_factor

  image, mask = batch["image"], batch["mask"]
  cond = pipe.text_hidden(params["text"], batch["ids"])
  uncond = pipe.text_hidden(params["text"], batch["negative_ids"]) if cfg else None
  f = pipe.vae_scale_factor
  shape = (image.shape[0], image.shape[1] // f, image.shape[2] // f, pipe.vae.cfg.latent_channels)
  mask_latent = diffusion_layers.nearest_resize(mask, shape[1:3])  # torch F.interpolate, mode "nearest"
  masked = batch.get("masked_image_latents")
  if masked is None:
    masked = encode(image * (mask < 0.5), k_masked)
  four = pipe.unet.cfg.in_channels == 4  # blends the kept region back: needs the image latents
  given = batch.get("latents")
  image_latents = encode(image, k_image) if four or (given is None and not strength_max) else None
  latents, noise = _start_latents(scheduler, num_inference_steps, first_index, strength_max, given,
                                  image_latents, shape, k_noise)
  z0 = sampler.sample_latents(pipe.unet, scheduler, params["unet"], latents, cond, uncond, mask_latent,
                              masked, guidance_scale, num_inference_steps, first_index,
                              image_latents=image_latents if four else None, noise=noise if four else None)
  return sampler.decode_images(pipe.vae_decode, params["vae"], z0, pipe.scaling_factor), z0


def _jitted(pipe: InpaintPipeline):
  """One jax.jit per pipeline object, kept on it: its cache holds one program per static setting
  (scheduler, steps, guidance on/off, strength == 1, posterior sampling) and input shape/sharding."""
  if "inpaint" not in pipe._programs:
    pipe._programs["inpaint"] = jax.jit(
        functools.partial(_program, pipe),
        static_argnames=("scheduler", "num_inference_steps", "cfg", "strength_max", "sample_posterior"))
  return pipe._programs["inpaint"]


def _texts(x, what: str, batch: int | None = None) -> list[str]:
  texts = [x] if isinstance(x, str) else list(x)
  if not all(isinstance(t, str) for t in texts) or not texts:
    raise ValueError(f"{what}: want a string or a list of strings, got {x!r}")
  if batch is not None and len(texts) == 1:
    texts = texts * batch
  if batch is not None and len(texts) != batch:
    raise ValueError(f"{what}: {len(texts)} texts for {batch} prompts")
  return texts


def _latents_array(x, what: str, batch: int, shape: tuple) -> np.ndarray:
  x = np.asarray(x, np.float32)
  x = x[None] if x.ndim == 3 else x
  if x.shape[0] == 1 and batch > 1:
    x = np.repeat(x, batch, axis=0)
  if x.shape != (batch,) + shape:
    raise ValueError(f"{what}: want NHWC shape {(batch,) + shape} (latents are NHWC here, not diffusers' "
                     f"NCHW), got {x.shape}")
  return x


def _resolve_scheduler(pipe: InpaintPipeline, scheduler):
  if scheduler is None:
    return pipe.scheduler
  if isinstance(scheduler, schedulers.Scheduler):
    return scheduler
  return schedulers.inpaint_pipeline_scheduler(pipe.scheduler.config, scheduler)


def inpaint(pipe: InpaintPipeline, params, prompt: str | Sequence[str], image, mask_image,
            negative_prompt: str | Sequence[str] | None = None, *, height: int | None = None,
            width: int | None = None, strength: float = 1.0, num_inference_steps: int = 50,
            guidance_scale: float = 7.5, seed: int = 0, scheduler=None, latents=None,
            masked_image_latents=None, sample_posterior: bool = True, return_latents: bool = False,
            mesh=None):
  """diffusers' `StableDiffusionInpaintPipeline(prompt, image, mask_image, ...)` as one jitted call.

  prompt: a string or B strings; negative_prompt: None ("" as diffusers), a string or B strings.
  image / mask_image: PIL images or arrays (uint8, or float in [0, 1]; NHWC [B, H, W, 3] / HWC; masks
    [B, H, W(, 1)] or [H, W]), one (used for every prompt) or B; mask 1 = repaint, binarized at 0.5.
  height, width: default the UNet's sample_size x the VAE factor (512 for SD-2), as diffusers; PIL
    inputs are resized to it (Lanczos), arrays must have it.
  strength, num_inference_steps, guidance_scale: as diffusers (guidance_scale <= 1 turns classifier-free
    guidance off; strength == 1 starts from pure noise and compiles its own program).
  seed: int (mod 2**32); draws the starting noise and the VAE posterior samples (jax.random, not torch's generator).
  scheduler: None (the pipeline's), a kind ('ddim', 'pndm', ...) made from the pipeline's config as
    diffusers' `Other.from_config(pipe.scheduler.config)`, or a `schedulers.Scheduler`.
  latents: NHWC [B, h, w, c] starting latents, used as given (diffusers' `latents=`; no noise added);
  masked_image_latents: NHWC scaled latents of the masked image (skips its VAE encode);
  sample_posterior: encode images to a posterior sample as diffusers does (False: the posterior mean).
  mesh: run batch-sharded over this ('data', 'fsdp') mesh; params already on it stay (e.g. FSDP from
    `parallel.shard_params`), others are replicated; the batch is padded to a multiple of its devices.
  Returns images [B, H, W, 3] float32 in [0, 1] (a jax.Array; `images.to_pil` makes PIL images), and the
  final latents [B, h, w, c] too with return_latents (diffusers' output_type="latent").
  """
  prompts = _texts(prompt, "prompt")
  b = len(prompts)
  if not 0 <= strength <= 1:
    raise ValueError(f"strength={strength} must be in [0, 1]")
  sched = _resolve_scheduler(pipe, scheduler)
  first = sampler.start_index(sched, num_inference_steps, strength)
  if first >= len(sampler.timestep_table(sched, num_inference_steps)):
    raise ValueError(f"strength={strength} with num_inference_steps={num_inference_steps} leaves no "
                     "denoising step")
  f = pipe.vae_scale_factor
  height = height or pipe.sample_size * f
  width = width or pipe.sample_size * f
  if height % f or width % f:
    raise ValueError(f"height={height} and width={width} must be multiples of the VAE factor {f}")
  x, mask = image_lib.image_and_mask(image, mask_image, height, width, b)
  cfg = guidance_scale > 1
  batch = {"ids": pipe.tokenize(prompts), "image": x, "mask": mask}
  if cfg:
    batch["negative_ids"] = pipe.tokenize(_texts("" if negative_prompt is None else negative_prompt,
                                                 "negative_prompt", b))
  latent_shape = (height // f, width // f, pipe.vae.cfg.latent_channels)
  if latents is not None:
    batch["latents"] = _latents_array(latents, "latents", b, latent_shape)
  if masked_image_latents is not None:
    batch["masked_image_latents"] = _latents_array(masked_image_latents, "masked_image_latents", b,
                                                   latent_shape)
  if mesh is not None:
    multiple = parallel.batch_size_multiple(mesh)
    if jax.process_count() > 1 and b % (multiple // jax.process_count()):
      raise ValueError(f"inpaint: {b} rows per process is not a multiple of this process's devices")
    batch = {k: parallel.pad_batch(v, multiple)[0] for k, v in batch.items()}
    batch, params = parallel.global_batch(batch, mesh), parallel.place_params(params, mesh)
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():  # fused attention per device
    out, z0 = _jitted(pipe)(params, batch, jnp.int32(first), jnp.float32(guidance_scale),
                            jnp.uint32(int(seed) % 2**32), scheduler=sched, num_inference_steps=int(num_inference_steps),
                            cfg=cfg, strength_max=strength == 1, sample_posterior=bool(sample_posterior))
  if out.shape[0] != b and jax.process_count() == 1:
    out, z0 = out[:b], z0[:b]
  return (out, z0) if return_latents else out


# The package exports the call under this name (`synood_jax.diffusion.inpaint` is the sampler module).
inpaint_images = inpaint

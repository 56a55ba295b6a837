"""One jitted Stable Diffusion in-painting sampler (diffusers' StableDiffusionInpaintPipeline loop).

eps_hat = eps_u + g * (eps_c - eps_u);  z_{t-1} = scheduler.step(eps_hat, t, z_t)

The loop always runs over the whole `num_inference_steps` table and skips the entries before the
strength cut (`start_index`, traced), so guidance scale and strength are traced values: new values never
recompile; only the step count, batch and latent size are static. Latents and scheduler state stay
float32 while the UNet may run in bfloat16.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from synood_jax import parallel
from synood_jax.diffusion import schedulers


def start_index(scheduler, num_inference_steps: int, strength: float) -> int:
  """Index of the first table entry kept by diffusers' get_timesteps (t_start * order)."""
  full = schedulers.set_timesteps(scheduler, num_inference_steps)
  kept, _ = schedulers.get_timesteps(scheduler, num_inference_steps, strength)
  return len(full) - len(kept)


def timestep_table(scheduler, num_inference_steps: int) -> np.ndarray:
  return schedulers.set_timesteps(scheduler, num_inference_steps)


def _guided_noise(unet_module, unet_params, latents, t, context, extra, guidance_scale, cfg: bool = True):
  """Both halves of classifier-free guidance in one UNet batch (uncond first, as diffusers); with
  `cfg` False one conditional half (diffusers when guidance_scale <= 1)."""
  copies = 2 if cfg else 1
  model_in = jnp.concatenate([latents] * copies, axis=0)
  if extra is not None:
    model_in = jnp.concatenate([model_in, jnp.concatenate([extra] * copies, axis=0)], axis=-1)
  dtype = unet_module.dtype
  out = unet_module.apply({"params": unet_params}, model_in.astype(dtype),
                          jnp.full((model_in.shape[0],), t), context.astype(dtype)).astype(jnp.float32)
  if not cfg:
    return out
  uncond, cond = jnp.split(out, 2, axis=0)
  return uncond + guidance_scale * (cond - uncond)


def sample_latents(unet_module, scheduler, unet_params, latents, prompt_embeds, negative_embeds,
                   mask, masked_image_latents, guidance_scale, num_inference_steps: int, first_index,
                   image_latents=None, noise=None, remat: bool = False, table=None):
  """Denoise `latents` over the table entries from `first_index` on; returns float32 latents.

  latents: [B, h, w, 4] starting noisy latents (diffusers' `latents=`; times init_noise_sigma);
  prompt_embeds / negative_embeds: [B, L, D] text-encoder hidden states (cond / uncond); negative_embeds
    None: no classifier-free guidance (diffusers' path for guidance_scale <= 1; guidance_scale unused);
  mask: [B, h, w, 1] at latent resolution (1 = repaint); masked_image_latents: [B, h, w, 4], scaled;
  first_index: from `start_index(...)` (a traced int is fine);
  image_latents, noise: 4-channel UNets only, which blend the kept region back after each step
  (diffusers: the source re-noised with `noise`, which is the `latents` passed in);
  table: `timestep_table(scheduler, num_inference_steps)`, if the caller has it already.
  """
  table = timestep_table(scheduler, num_inference_steps) if table is None else table
  n = len(table)
  ts = jnp.asarray(table, jnp.int32)
  nine = unet_module.cfg.in_channels == 9
  if not nine and (image_latents is None or noise is None):
    raise ValueError("a 4-channel UNet blends the source back: pass image_latents and noise")
  latents = latents.astype(jnp.float32) * scheduler.init_noise_sigma
  cfg = negative_embeds is not None
  context = jnp.concatenate([negative_embeds, prompt_embeds], axis=0) if cfg else prompt_embeds
  extra = jnp.concatenate([mask, masked_image_latents], axis=-1) if nine else None
  state = schedulers.init_state(scheduler, table, latents.shape, num_inference_steps=num_inference_steps)

  guided = lambda p, x, t: _guided_noise(unet_module, p, x, t, context, extra, guidance_scale, cfg)
  if remat:
    guided = jax.checkpoint(guided)

  def denoise(i, x, state):
    t = ts[i]
    eps = guided(unet_params, schedulers.scale_model_input(scheduler, x, t), t)
    x, state = schedulers.step(scheduler, state, eps, i, x)
    if not nine:
      renoised = schedulers.add_noise(scheduler, image_latents, noise, ts[jnp.minimum(i + 1, n - 1)])
      proper = jnp.where(i < n - 1, renoised, image_latents)
      x = (1.0 - mask) * proper + mask * x
    return x, state

  def body(i, carry):
    x, state = carry
    return jax.lax.cond(i >= first_index, lambda: denoise(i, x, state), lambda: (x, state))

  latents, _ = jax.lax.fori_loop(0, n, body, (latents, state))
  return latents


def decoder_input(latents, scaling_factor: float, latents_mean=None, latents_std=None):
  """The VAE decoder's input u from scaled latents z: u = z / scaling_factor, or
  u = z * latents_std / scaling_factor + latents_mean for a VAE whose config has latent statistics
  (diffusers' convention, and the variable the official SynOOD script differentiates)."""
  if latents_mean is None or latents_std is None:
    return latents / scaling_factor
  mean = jnp.asarray(latents_mean, jnp.float32)
  std = jnp.asarray(latents_std, jnp.float32)
  return latents * std / scaling_factor + mean


def decode_unscaled(vae_fn, vae_params, u, chunk: int | None = None):
  """Images in [0, 1] from decoder inputs u: clip(D(u) / 2 + 0.5); decode `chunk` rows at a time
  (`parallel.map_rows`) so a large batch does not run out of memory in the VAE decoder."""
  def one(z):
    return jnp.clip(vae_fn(vae_params, z).astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
  return parallel.map_rows(one, u, chunk or 0)


def decode_images(vae_fn, vae_params, latents, scaling_factor: float, chunk: int | None = None):
  """Images in [0, 1] from scaled latents: clip(D(z / scale) / 2 + 0.5)."""
  return decode_unscaled(vae_fn, vae_params, decoder_input(latents, scaling_factor), chunk)

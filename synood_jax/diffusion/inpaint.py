"""One jitted Stable Diffusion in-painting sampler (diffusers' StableDiffusionInpaintPipeline loop).

eps_hat = eps_u + g * (eps_c - eps_u);  z_{t-1} = scheduler.step(eps_hat, t, z_t)

Guidance scale and the strength cut are traced values (new values never recompile); only the number of
steps run, the batch and the latent size are static. Latents and scheduler state stay float32 while the
UNet may run in bfloat16.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from synood_jax.diffusion import schedulers


def unet_channels_in(unet_module) -> int:
  return int(unet_module.config["in_channels"])


def _cfg_noise(unet_module, unet_params, latents, t, context, mask, masked_latents, guidance_scale):
  """One guided UNet evaluation: both halves of classifier-free guidance in one batch."""
  model_in = jnp.concatenate([latents, latents], axis=0)
  if unet_channels_in(unet_module) == 9:
    extra = jnp.concatenate([mask, masked_latents], axis=-1)
    model_in = jnp.concatenate([model_in, jnp.concatenate([extra, extra], axis=0)], axis=-1)
  dtype = jax.tree_util.tree_leaves(unet_params)[0].dtype
  out = unet_module.apply({"params": unet_params}, model_in.astype(dtype),
                          jnp.full((model_in.shape[0],), t), context.astype(dtype))
  uncond, cond = jnp.split(out.astype(jnp.float32), 2, axis=0)
  return uncond + guidance_scale * (cond - uncond)


def sample_latents(unet_module, scheduler, unet_params, latents, prompt_embeds, negative_embeds,
                   mask, masked_image_latents, guidance_scale, timesteps,
                   image_latents=None, noise=None, remat: bool = False):
  """Run the denoising loop over `timesteps` (already cut by strength) from `latents`.

  latents: [B, h, w, 4] the starting noisy latents (diffusers' `latents=`, times init_noise_sigma);
  prompt_embeds / negative_embeds: [B, L, D] text-encoder hidden states (cond / uncond);
  mask: [B, h, w, 1] at latent resolution (1 = repaint); masked_image_latents: [B, h, w, 4], scaled;
  image_latents, noise: only for 4-channel UNets, which blend the known region back after each step
  (diffusers' semantics: the re-noised source uses `noise`, the latents passed in).
  """
  latents = latents.astype(jnp.float32) * scheduler.init_noise_sigma
  context = jnp.concatenate([negative_embeds, prompt_embeds], axis=0)
  nine = unet_channels_in(unet_module) == 9
  if not nine and (image_latents is None or noise is None):
    raise ValueError("a 4-channel UNet blends the source back: pass image_latents and noise")
  n = timesteps.shape[0]
  state = schedulers.init_state(scheduler, timesteps)

  def guided(unet_params, x, t):
    return _cfg_noise(unet_module, unet_params, x, t, context, mask, masked_image_latents, guidance_scale)
  if remat:
    guided = jax.checkpoint(guided)

  def body(i, carry):
    x, state = carry
    t = timesteps[i]
    eps = guided(unet_params, schedulers.scale_model_input(scheduler, x, t), t)
    x, state = schedulers.step(scheduler, state, eps, i, x)
    if not nine:
      proper = jnp.where(i < n - 1,
                         schedulers.add_noise(scheduler, image_latents, noise,
                                              timesteps[jnp.minimum(i + 1, n - 1)]),
                         image_latents)
      x = (1.0 - mask) * proper + mask * x
    return x, state

  latents, _ = jax.lax.fori_loop(0, n, body, (latents, state))
  return latents

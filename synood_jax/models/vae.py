"""Stable Diffusion AutoencoderKL in Flax (NHWC), read from / written to diffusers folders.

q(z|x) = N(mean, exp(logvar)) from `encode`; x = D(z) from `decode`; latents are unscaled
(multiply by `scaling_factor` before the UNet, divide after, as diffusers pipelines do).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from synood_jax.models import attention as attention_lib, checkpoint_io
from synood_jax.models import diffusion_layers as L

CLASS_NAME = "AutoencoderKL"

TINY_VAE_CONFIG = {
    "_class_name": CLASS_NAME,
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "norm_num_groups": 8,
    "act_fn": "silu",
    "scaling_factor": 0.18215,
}

_FIXED = {"act_fn": ("silu", "swish"), "shift_factor": (None,)}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple = (64,)
  layers_per_block: int = 1
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  # Per-channel latent statistics (some VAEs): the decoder's input is z * std / scaling_factor + mean.
  latents_mean: tuple | None = None
  latents_std: tuple | None = None

  @classmethod
  def from_dict(cls, cfg: dict, source: str = "config") -> "VAEConfig":
    bad = L.config_checker(cfg, _FIXED, source, "AutoencoderKL")
    boc = tuple(cfg.get("block_out_channels", (64,)))
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
      types = tuple(cfg.get(key, (want,)))
      if any(t != want for t in types) or len(types) != len(boc):
        raise bad(key, f"need {len(boc)} x {want!r}")
    return cls(in_channels=int(cfg.get("in_channels", 3)), out_channels=int(cfg.get("out_channels", 3)),
               latent_channels=int(cfg.get("latent_channels", 4)), block_out_channels=boc,
               layers_per_block=int(cfg.get("layers_per_block", 1)),
               norm_num_groups=int(cfg.get("norm_num_groups", 32)),
               scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
               use_quant_conv=bool(cfg.get("use_quant_conv", True)),
               use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
               mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)),
               latents_mean=_stats(cfg, "latents_mean", source),
               latents_std=_stats(cfg, "latents_std", source))


def _stats(cfg: dict, key: str, source: str) -> tuple | None:
  value = cfg.get(key)
  if value is None:
    return None
  n = int(cfg.get("latent_channels", 4))
  if len(value) != n:
    raise ValueError(f"{source}: {key} has {len(value)} values, expected latent_channels = {n}")
  return tuple(float(v) for v in value)


class MidBlock(nn.Module):
  """UNetMidBlock2D without time: resnet, single-head self-attention (GroupNorm, residual), resnet."""
  channels: int
  groups: int
  add_attention: bool
  dtype: Any = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x):
    c, g, d = self.channels, self.groups, self.dtype
    x = L.ResnetBlock2D(c, g, 1e-6, dtype=d, name="resnets_0")(x)
    if self.add_attention:
      b, h, w, _ = x.shape
      attn = L.Attention(1, c, c, qkv_bias=True, norm_groups=g, norm_eps=1e-6, residual=True, dtype=d,
                         attention=self.attention, name="attentions_0")
      x = attn(x.reshape(b, h * w, c)).reshape(b, h, w, c)
    return L.ResnetBlock2D(c, g, 1e-6, dtype=d, name="resnets_1")(x)


class DownEncoderBlock2D(nn.Module):
  channels: int
  groups: int
  num_layers: int
  add_downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = L.ResnetBlock2D(self.channels, self.groups, 1e-6, dtype=self.dtype, name=f"resnets_{j}")(x)
    if self.add_downsample:  # diffusers' VAE pads (0, 1) then convolves without padding
      x = L.Downsample2D(self.channels, 0, self.dtype, name="downsamplers_0")(x)
    return x


class UpDecoderBlock2D(nn.Module):
  channels: int
  groups: int
  num_layers: int
  add_upsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = L.ResnetBlock2D(self.channels, self.groups, 1e-6, dtype=self.dtype, name=f"resnets_{j}")(x)
    if self.add_upsample:
      x = L.Upsample2D(self.channels, self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  cfg: VAEConfig
  dtype: Any = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x):
    c, d = self.cfg, self.dtype
    boc, g = c.block_out_channels, c.norm_num_groups
    x = L.conv(boc[0], 3, d, "conv_in")(x.astype(d))
    for i, ch in enumerate(boc):
      x = DownEncoderBlock2D(ch, g, c.layers_per_block, i < len(boc) - 1, d, name=f"down_blocks_{i}")(x)
    x = MidBlock(boc[-1], g, c.mid_block_add_attention, d, self.attention, name="mid_block")(x)
    x = nn.silu(L.GroupNorm(g, 1e-6, d, name="conv_norm_out")(x))
    return L.conv(2 * c.latent_channels, 3, d, "conv_out")(x)


class Decoder(nn.Module):
  cfg: VAEConfig
  dtype: Any = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, z):
    c, d = self.cfg, self.dtype
    boc, g = c.block_out_channels[::-1], c.norm_num_groups
    x = L.conv(boc[0], 3, d, "conv_in")(z.astype(d))
    x = MidBlock(boc[0], g, c.mid_block_add_attention, d, self.attention, name="mid_block")(x)
    for i, ch in enumerate(boc):
      x = UpDecoderBlock2D(ch, g, c.layers_per_block + 1, i < len(boc) - 1, d, name=f"up_blocks_{i}")(x)
    x = nn.silu(L.GroupNorm(g, 1e-6, d, name="conv_norm_out")(x))
    return L.conv(c.out_channels, 3, d, "conv_out")(x)


class AutoencoderKL(nn.Module):
  """Call `apply(..., method=module.encode)` or `method=module.decode`; `__call__` runs both (init)."""
  cfg: VAEConfig
  dtype: Any = jnp.float32
  attention: str = "auto"       # the mid-blocks' attention kernel (models/attention.py)

  @property
  def scaling_factor(self) -> float:
    return self.cfg.scaling_factor

  def setup(self):
    c, d = self.cfg, self.dtype
    self.encoder = Encoder(c, d, self.attention)
    self.decoder = Decoder(c, d, self.attention)
    if c.use_quant_conv:
      self.quant_conv = L.conv(2 * c.latent_channels, 1, d, None)
    if c.use_post_quant_conv:
      self.post_quant_conv = L.conv(c.latent_channels, 1, d, None)

  def encode(self, x):
    """Image NHWC in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent_channels], unscaled."""
    h = self.encoder(x)
    if self.cfg.use_quant_conv:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z):
    """Unscaled latents NHWC -> image NHWC (about [-1, 1]; not clipped, as diffusers)."""
    z = z.astype(self.dtype)
    if self.cfg.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x):
    mean, _ = self.encode(x)
    return self.decode(mean)


def vae_sample(mean, logvar, rng):
  """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I) (DiagonalGaussianDistribution.sample)."""
  eps = jax.random.normal(rng, mean.shape, jnp.float32).astype(mean.dtype)
  return mean + jnp.exp(0.5 * logvar) * eps


def scale_factor(config: dict) -> int:
  """Image pixels per latent pixel: 2 ** (number of down blocks - 1)."""
  return 2 ** (len(config.get("block_out_channels", (64,))) - 1)


# ---------------------------------------------------------------------------------------------
# Folders.

# Old checkpoints (e.g. SD 1.x VAEs) name the mid-block attention like the original LDM code.
_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename(key: str) -> str:
  parts = key.split(".")
  if "attentions" in parts and len(parts) >= 2 and parts[-2] in _OLD_ATTN:
    parts[-2] = _OLD_ATTN[parts[-2]]
  return ".".join(parts)


def build(config: dict, dtype=jnp.float32, source: str = "config", attention: str = "auto") -> AutoencoderKL:
  return AutoencoderKL(VAEConfig.from_dict(dict(config), source), dtype, attention_lib.check_choice(attention))


def _dummy(module: AutoencoderKL, dtype):
  s = 2 ** (len(module.cfg.block_out_channels) - 1)
  return jnp.zeros((1, s, s, module.cfg.in_channels), dtype)


def param_shapes(module: AutoencoderKL) -> dict:
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), _dummy(module, module.dtype))["params"]


def init_params(config: dict, rng, dtype=jnp.float32) -> dict:
  """Random Flax params for `config` (no torch needed); pair with `save` for toy models."""
  return L.random_params(param_shapes(build(config, dtype)), rng)


def config(folder: str) -> dict:
  """A diffusers AutoencoderKL folder's config.json, checked (what this port does not implement is refused)."""
  cfg = checkpoint_io.read_config(folder)
  VAEConfig.from_dict(cfg, os.path.join(folder, "config.json"))
  return cfg


def load(folder: str, dtype=jnp.float32, attention: str = "auto"):
  """A diffusers AutoencoderKL folder -> (module, params)."""
  return checkpoint_io.load_diffusers_folder(folder, functools.partial(build, attention=attention), param_shapes, dtype, rename=_rename)


def save(folder: str, config: dict, params) -> None:
  """Write config.json + diffusion_pytorch_model.safetensors that diffusers' from_pretrained loads."""
  VAEConfig.from_dict(dict(config))  # refuse to write what we could not read back
  checkpoint_io.save_diffusers_folder(folder, config, params, CLASS_NAME)

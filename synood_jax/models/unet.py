"""Stable Diffusion 1.x/2.x UNet2DConditionModel in Flax, NHWC, read from / written to diffusers folders.

eps_theta(x_t, t, c): the denoiser of SD's reverse process (epsilon or v prediction, per scheduler).
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

CLASS_NAME = "UNet2DConditionModel"
LITERAL = frozenset({"linear_1", "linear_2"})  # torch names that really end in "_N"

# SD2-inpainting-shaped toy: 9 input channels, linear projections, text hidden size 32.
TINY_UNET_CONFIG = {
    "_class_name": CLASS_NAME,
    "sample_size": 16,
    "in_channels": 9,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "attention_head_dim": [2, 4],
    "cross_attention_dim": 32,
    "use_linear_projection": True,
    "upcast_attention": False,
    "norm_num_groups": 8,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "act_fn": "silu",
}

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
# Config keys we do not implement: each must keep one of the listed (diffusers default) values.
_FIXED = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "act_fn": ("silu", "swish"),
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The parsed, validated subset of a diffusers UNet2DConditionModel config.json."""
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: tuple = (320, 640, 1280, 1280)
  down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  layers_per_block: tuple = (2, 2, 2, 2)
  heads: tuple = (8, 8, 8, 8)  # diffusers' `attention_head_dim` is really the number of heads
  cross_attention_dim: tuple = (1280,) * 4
  transformer_layers: tuple = (1, 1, 1, 1)
  use_linear_projection: bool = False
  upcast_attention: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  center_input_sample: bool = False
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  time_embedding_dim: int | None = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3

  @classmethod
  def from_dict(cls, cfg: dict, source: str = "config") -> "UNetConfig":
    bad = L.config_checker(cfg, _FIXED, source, "UNet")
    d = cls()
    down = tuple(cfg.get("down_block_types", d.down_block_types))
    up = tuple(cfg.get("up_block_types", d.up_block_types))
    for key, types, ok in (("down_block_types", down, DOWN_TYPES), ("up_block_types", up, UP_TYPES)):
      for t in types:
        if t not in ok:
          raise bad(key, f"block type {t!r} not implemented; supported: {ok}")
    n = len(down)
    boc = tuple(cfg.get("block_out_channels", d.block_out_channels))
    if len(boc) != n or len(up) != n:
      raise bad("block_out_channels", f"need one per down/up block ({n})")

    def per_block(key, default):
      v = cfg.get(key, default)
      v = tuple(v) if isinstance(v, (list, tuple)) else (v,) * n
      if len(v) != n or any(not isinstance(x, int) or isinstance(x, bool) or x < 1 for x in v):
        raise bad(key, f"need a positive int or {n} of them")
      return v

    heads = per_block("attention_head_dim", 8)
    for h, c in zip(heads, boc):
      if c % h:
        raise bad("attention_head_dim", f"{c} channels not divisible by {h} heads")
    tl = per_block("transformer_layers_per_block", 1)
    groups = cfg.get("norm_num_groups", 32)
    if groups is None:
      raise bad("norm_num_groups", "None (no output norm) is not implemented")
    return cls(
        in_channels=int(cfg.get("in_channels", 4)), out_channels=int(cfg.get("out_channels", 4)),
        block_out_channels=boc, down_block_types=down, up_block_types=up,
        layers_per_block=per_block("layers_per_block", 2), heads=heads,
        cross_attention_dim=per_block("cross_attention_dim", 1280), transformer_layers=tl,
        use_linear_projection=bool(cfg.get("use_linear_projection", False)),
        upcast_attention=bool(cfg.get("upcast_attention", False)),
        norm_num_groups=int(groups), norm_eps=float(cfg.get("norm_eps", 1e-5)),
        flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
        freq_shift=float(cfg.get("freq_shift", 0)),
        center_input_sample=bool(cfg.get("center_input_sample", False)),
        downsample_padding=int(cfg.get("downsample_padding", 1)),
        mid_block_scale_factor=float(cfg.get("mid_block_scale_factor", 1.0)),
        time_embedding_dim=cfg.get("time_embedding_dim"),
        conv_in_kernel=int(cfg.get("conv_in_kernel", 3)), conv_out_kernel=int(cfg.get("conv_out_kernel", 3)))


class DownBlock(nn.Module):
  """CrossAttnDownBlock2D (with_attn) or DownBlock2D: resnets (+ transformers), then a stride-2 conv."""
  cfg: UNetConfig
  index: int
  with_attn: bool
  add_downsample: bool
  dtype: Any = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, temb, context):
    c, i = self.cfg, self.index
    ch, skips = c.block_out_channels[i], []
    for j in range(c.layers_per_block[i]):
      x = L.ResnetBlock2D(ch, c.norm_num_groups, c.norm_eps, dtype=self.dtype, name=f"resnets_{j}")(x, temb)
      if self.with_attn:
        x = L.Transformer2DModel(c.heads[i], ch // c.heads[i], c.norm_num_groups, c.use_linear_projection,
                                 c.transformer_layers[i], self.dtype, self.attention,
                                 name=f"attentions_{j}")(x, context)
      skips.append(x)
    if self.add_downsample:
      x = L.Downsample2D(ch, c.downsample_padding, self.dtype, name="downsamplers_0")(x)
      skips.append(x)
    return x, skips


class MidBlock(nn.Module):
  """UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""
  cfg: UNetConfig
  dtype: Any = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, temb, context):
    c = self.cfg
    ch, heads = c.block_out_channels[-1], c.heads[-1]
    res = lambda name: L.ResnetBlock2D(ch, c.norm_num_groups, c.norm_eps, c.mid_block_scale_factor,
                                       self.dtype, name=name)
    x = res("resnets_0")(x, temb)
    x = L.Transformer2DModel(heads, ch // heads, c.norm_num_groups, c.use_linear_projection,
                             c.transformer_layers[-1], self.dtype, self.attention, name="attentions_0")(x, context)
    return res("resnets_1")(x, temb)


class UpBlock(nn.Module):
  """CrossAttnUpBlock2D / UpBlock2D number `index` (counted from the bottom), consuming skips."""
  cfg: UNetConfig
  index: int
  with_attn: bool
  add_upsample: bool
  dtype: Any = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, temb, context, skips, upsample_size=None):
    c, i = self.cfg, self.index
    rev = len(c.block_out_channels) - 1 - i  # the matching down level
    ch, heads = c.block_out_channels[rev], c.heads[rev]
    for j in range(c.layers_per_block[rev] + 1):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = L.ResnetBlock2D(ch, c.norm_num_groups, c.norm_eps, dtype=self.dtype, name=f"resnets_{j}")(x, temb)
      if self.with_attn:
        x = L.Transformer2DModel(heads, ch // heads, c.norm_num_groups, c.use_linear_projection,
                                 c.transformer_layers[rev], self.dtype, self.attention,
                                 name=f"attentions_{j}")(x, context)
    if self.add_upsample:
      x = L.Upsample2D(ch, self.dtype, name="upsamplers_0")(x, upsample_size)
    return x


class UNet2DConditionModel(nn.Module):
  """apply({'params': p}, sample [B,H,W,Cin], timesteps scalar or [B], context [B,L,D]) -> [B,H,W,Cout]."""
  cfg: UNetConfig
  dtype: Any = jnp.float32
  attention: str = "auto"       # the attention kernel (models/attention.py)

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states):
    c, d = self.cfg, self.dtype
    b = sample.shape[0]
    if sample.shape[-1] != c.in_channels:
      raise ValueError(f"UNet: sample has shape {sample.shape} (NHWC), config in_channels={c.in_channels}")
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (b,))
    t_emb = L.timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
    temb = L.TimestepEmbedding(c.time_embedding_dim or 4 * c.block_out_channels[0], d,
                               name="time_embedding")(t_emb)
    context = encoder_hidden_states.astype(d)
    x = sample.astype(d)
    if c.center_input_sample:
      x = 2 * x - 1.0
    x = L.conv(c.block_out_channels[0], c.conv_in_kernel, d, "conv_in")(x)

    skips, n = [x], len(c.block_out_channels)
    for i, kind in enumerate(c.down_block_types):
      x, s = DownBlock(c, i, kind == "CrossAttnDownBlock2D", i < n - 1, d, self.attention,
                       name=f"down_blocks_{i}")(
          x, temb, context)
      skips += s
    x = MidBlock(c, d, self.attention, name="mid_block")(x, temb, context)
    # Sizes not divisible by the total stride: upsample to the skip's size, as diffusers does.
    odd = any(s % 2 ** (n - 1) for s in sample.shape[1:3])
    for i, kind in enumerate(c.up_block_types):
      k = c.layers_per_block[n - 1 - i] + 1
      block_skips, skips = skips[-k:], skips[:-k]
      size = skips[-1].shape[1:3] if (odd and i < n - 1) else None
      x = UpBlock(c, i, kind == "CrossAttnUpBlock2D", i < n - 1, d, self.attention, name=f"up_blocks_{i}")(
          x, temb, context, list(block_skips), size)
    x = nn.silu(L.GroupNorm(c.norm_num_groups, c.norm_eps, d, name="conv_norm_out")(x))
    return L.conv(c.out_channels, c.conv_out_kernel, d, "conv_out")(x)


# ---------------------------------------------------------------------------------------------
# Folders.

def build(config: dict, dtype=jnp.float32, source: str = "config",
          attention: str = "auto") -> UNet2DConditionModel:
  return UNet2DConditionModel(UNetConfig.from_dict(dict(config), source), dtype,
                              attention_lib.check_choice(attention))


def _dummy_inputs(module: UNet2DConditionModel, dtype):
  c = module.cfg
  s = 2 ** (len(c.block_out_channels) - 1)
  return (jnp.zeros((1, s, s, c.in_channels), dtype), jnp.zeros((1,), jnp.float32),
          jnp.zeros((1, 1, c.cross_attention_dim[0]), dtype))


def init_params(config: dict, rng, dtype=jnp.float32) -> dict:
  """Random Flax params for `config` (no torch needed); pair with `save` for toy models."""
  return L.random_params(param_shapes(build(config, dtype)), rng)


def param_shapes(module: UNet2DConditionModel) -> dict:
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *_dummy_inputs(module, module.dtype))
  return shapes["params"]


def config(folder: str) -> dict:
  """A diffusers UNet folder's config.json, checked (what this port does not implement is refused)."""
  cfg = checkpoint_io.read_config(folder)
  UNetConfig.from_dict(cfg, os.path.join(folder, "config.json"))
  return cfg


def load(folder: str, dtype=jnp.float32, attention: str = "auto"):
  """A diffusers UNet folder (config.json + safetensors or .bin) -> (module, params)."""
  return checkpoint_io.load_diffusers_folder(folder, functools.partial(build, attention=attention), param_shapes, dtype)


def save(folder: str, config: dict, params) -> None:
  """Write config.json + diffusion_pytorch_model.safetensors that diffusers' from_pretrained loads."""
  UNetConfig.from_dict(dict(config))  # refuse to write what we could not read back
  checkpoint_io.save_diffusers_folder(folder, config, params, CLASS_NAME, literal=LITERAL)

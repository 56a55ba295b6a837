"""Building blocks shared by the Stable Diffusion UNet and VAE (NHWC), named after diffusers' modules.

Module and param names follow diffusers so `checkpoint_io` converts state dicts generically:
a Python list in torch (`resnets.0`) is a Flax child named `resnets_0`.
Compute runs in `dtype` (float32 or bfloat16); GroupNorm/LayerNorm statistics and attention
softmax always run in float32. `attention` names the attention kernel (models/attention.py).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synood_jax.models import attention as attention_lib

Dtype = Any


def config_checker(cfg: dict, fixed: dict, source: str, what: str):
  """Refuse config values this port does not implement (naming the key); returns the error maker."""
  def bad(key, why):
    return ValueError(f"{source}: unsupported {what} config {key}={cfg.get(key)!r} ({why})")
  for key, allowed in fixed.items():
    if key in cfg and cfg[key] not in allowed:
      raise bad(key, f"this port supports only {allowed}")
  return bad


def conv(features: int, kernel: int, dtype: Dtype, name: str | None, stride: int = 1,
         padding: Any = None) -> nn.Conv:
  """torch Conv2d(k, padding=k//2) unless `padding` (Flax pairs) says otherwise."""
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, param_dtype=dtype, name=name)


def dense(features: int, dtype: Dtype, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=dtype, name=name)


def group_mean(x):
  """Mean of [B, *spatial, G, C/G] over everything but batch and group, keepdims, in two stages:
  the spatial axes first, then the channels in each group.

  One XLA CPU reduce over (H, W, C/G) at once loses precision: on a per-channel-constant input (the
  first GroupNorm of an all-zero image) its mean was off by 1e-5 of the group's standard deviation,
  and the tiny VAE's encode of a zero image by 7.4e-6 relative to float64 (torch float32: 1.6e-6).
  The spatial mean of each channel is accurate, and averaging C/G such means adds little.
  """
  spatial = tuple(range(1, x.ndim - 2))
  return x.mean(spatial, keepdims=True).mean(-1, keepdims=True)


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm over the channel (last) axis, in float32:

  y = (x - mu_g) / sqrt(var_g + eps) * scale + bias,  mu_g = mean_{spatial, c in g} x,
  var_g = mean (x - mu_g)^2 (two passes; each mean in two stages, see `group_mean`)."""
  num_groups: int
  eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm {self.name}: {c} channels not divisible by {self.num_groups} groups")
    scale = self.param("scale", nn.initializers.ones, (c,), self.dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.dtype)
    xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (self.num_groups, c // self.num_groups))
    mean = group_mean(xf)
    var = group_mean(jnp.square(xf - mean))
    y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
  # Two-pass variance like torch; Flax computes LayerNorm statistics in float32 for bf16 inputs.
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=dtype, name=name)


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0):
  """diffusers `get_timestep_embedding`: [B] -> [B, dim] sinusoids, float32."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  emb = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(emb), jnp.cos(emb)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """linear_1 -> SiLU -> linear_2 (torch names really are `linear_1`, `linear_2`)."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = dense(self.features, self.dtype, "linear_1")(x.astype(self.dtype))
    return dense(self.features, self.dtype, "linear_2")(nn.silu(x))


class ResnetBlock2D(nn.Module):
  """norm1-silu-conv1 (+ time projection) norm2-silu-conv2, plus a 1x1 shortcut when channels change."""
  out_channels: int
  groups: int
  eps: float
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None):
    h = nn.silu(GroupNorm(self.groups, self.eps, self.dtype, name="norm1")(x))
    h = conv(self.out_channels, 3, self.dtype, "conv1")(h)
    if temb is not None:
      h = h + dense(self.out_channels, self.dtype, "time_emb_proj")(nn.silu(temb))[:, None, None, :]
    h = nn.silu(GroupNorm(self.groups, self.eps, self.dtype, name="norm2")(h))
    h = conv(self.out_channels, 3, self.dtype, "conv2")(h)  # dropout: inference only
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
    out = x + h
    return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv; padding 0 means diffusers' asymmetric (0, 1) pad used by the VAE."""
  out_channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    pad = ((0, 1), (0, 1)) if self.padding == 0 else ((self.padding, self.padding),) * 2
    return conv(self.out_channels, 3, self.dtype, "conv", stride=2, padding=pad)(x)


def nearest_resize(x, size: Sequence[int]):
  """torch F.interpolate(mode='nearest', size=...) on NHWC: src = floor(dst * float32(in/out)).

  Doubling (every decoder and UNet upsampler) is a broadcast and a reshape, not a gather: the gather's
  gradient is a scatter-add, which made the VAE decoder's backward pass (the refinement gradient) slower
  on CPU."""
  for axis, out in zip((1, 2), size):
    n = x.shape[axis]
    if out == n:
      continue
    if out == 2 * n:
      doubled = jnp.broadcast_to(jnp.expand_dims(x, axis + 1), x.shape[:axis + 1] + (2,) + x.shape[axis + 1:])
      x = doubled.reshape(x.shape[:axis] + (out,) + x.shape[axis + 1:])
      continue
    scale = np.float32(n) / np.float32(out)
    idx = np.minimum(np.floor(np.arange(out, dtype=np.float32) * scale).astype(np.int64), n - 1)
    x = jnp.take(x, jnp.asarray(idx), axis=axis)
  return x


class Upsample2D(nn.Module):
  """Nearest 2x (or to `output_size`, for sizes not divisible by the UNet's total stride) then 3x3 conv."""
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, output_size=None):
    x = nearest_resize(x, output_size or (2 * x.shape[1], 2 * x.shape[2]))
    return conv(self.out_channels, 3, self.dtype, "conv")(x)


class Attention(nn.Module):
  """diffusers `Attention` on [B, T, C] tokens: to_q/to_k/to_v, heads, to_out.0.

  `group_norm` / `residual` give the VAE mid-block variant. Logits and softmax are float32, which
  covers diffusers' upcast_attention / upcast_softmax.
  """
  heads: int
  dim_head: int
  out_dim: int
  qkv_bias: bool = False
  norm_groups: int | None = None
  norm_eps: float = 1e-6
  residual: bool = False
  dtype: Dtype = jnp.float32
  attention: str = "auto"       # the kernel (models/attention.py)

  @nn.compact
  def __call__(self, x, context=None):
    residual = x
    if self.norm_groups is not None:
      x = GroupNorm(self.norm_groups, self.norm_eps, self.dtype, name="group_norm")(x)
    context = x if context is None else context.astype(self.dtype)
    inner = self.heads * self.dim_head
    q = dense(inner, self.dtype, "to_q", self.qkv_bias)(x)
    k = dense(inner, self.dtype, "to_k", self.qkv_bias)(context)
    v = dense(inner, self.dtype, "to_v", self.qkv_bias)(context)
    heads = (t.reshape(t.shape[:2] + (self.heads, self.dim_head)) for t in (q, k, v))
    h = attention_lib.attention(*heads, kernel=self.attention)
    h = dense(self.out_dim, self.dtype, "to_out_0")(h.reshape(x.shape[:2] + (inner,)))
    return h + residual if self.residual else h


class GEGLU(nn.Module):
  inner: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x, gate = jnp.split(dense(2 * self.inner, self.dtype, "proj")(x), 2, axis=-1)
    return x * nn.gelu(gate, approximate=False)  # torch F.gelu default is exact erf


class FeedForward(nn.Module):
  """net.0 = GEGLU (dim -> 4 dim), net.1 = dropout, net.2 = Linear back to dim."""
  dim: int
  mult: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = GEGLU(self.dim * self.mult, self.dtype, name="net_0")(x)
    return dense(self.dim, self.dtype, "net_2")(x)


class BasicTransformerBlock(nn.Module):
  """Pre-LN self-attention, cross-attention and GEGLU feed-forward, each with a residual."""
  dim: int
  heads: int
  dim_head: int
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, context):
    d, kernel = self.dtype, self.attention
    x = x + Attention(self.heads, self.dim_head, self.dim, dtype=d, attention=kernel, name="attn1")(
        layer_norm(1e-5, d, "norm1")(x))
    x = x + Attention(self.heads, self.dim_head, self.dim, dtype=d, attention=kernel, name="attn2")(
        layer_norm(1e-5, d, "norm2")(x), context)
    return x + FeedForward(self.dim, dtype=d, name="ff")(layer_norm(1e-5, d, "norm3")(x))


class Transformer2DModel(nn.Module):
  """GroupNorm (eps 1e-6) -> proj_in (Linear if use_linear_projection else 1x1 conv) -> blocks -> proj_out."""
  heads: int
  dim_head: int
  groups: int
  use_linear_projection: bool
  num_layers: int = 1
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, context):
    b, hh, ww, c = x.shape
    inner = self.heads * self.dim_head
    proj = ((lambda f, n: dense(f, self.dtype, n)) if self.use_linear_projection
            else (lambda f, n: conv(f, 1, self.dtype, n)))  # same math, different param shape
    h = GroupNorm(self.groups, 1e-6, self.dtype, name="norm")(x)
    h = proj(inner, "proj_in")(h).reshape(b, hh * ww, inner)
    for i in range(self.num_layers):
      h = BasicTransformerBlock(inner, self.heads, self.dim_head, self.dtype, self.attention,
                                name=f"transformer_blocks_{i}")(h, context)
    h = proj(c, "proj_out")(h.reshape(b, hh, ww, inner))
    return h + x


def random_params(shapes, rng, std: float = 1.0):
  """Random params for a tree of ShapeDtypeStructs, drawn in numpy (jitting `init` of a UNet costs a
  minute on CPU): kernels/embeddings ~ N(0, std^2 / fan_in), norm scales 1, biases 0."""
  seed = np.asarray(jax.random.key_data(rng) if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
                    else rng).ravel().tolist()
  gen = np.random.default_rng(seed)

  def one(path, s):
    leaf = str(getattr(path[-1], "key", path[-1]))
    if leaf == "scale":
      v = np.ones(s.shape)
    elif leaf == "bias":
      v = np.zeros(s.shape)
    else:
      v = gen.standard_normal(s.shape) * std / np.sqrt(max(1, int(np.prod(s.shape[:-1]))))
    return jnp.asarray(v, s.dtype)

  return jax.tree_util.tree_map_with_path(one, shapes)

"""CLIP (ViT image tower + causal text transformer) as Flax Linen modules.

Module names follow transformers' `CLIPModel` (`vision_model/encoder/layers_0/self_attn/q_proj`, ...)
so `checkpoint_io` converts the state dict generically. Features: f = W_proj . pool(transformer(x)),
returned unnormalized (cosine similarity is the caller's business). Loading and saving: `clip.py`.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from synood_jax.models import attention as attention_lib
from synood_jax.models.clip_config import ACTIVATIONS, CLIPConfig, TowerConfig

Dtype = Any


def _normal(std: float):
  return nn.initializers.normal(stddev=std)


class _TowerModule(nn.Module):
  """The fields every module of a tower takes: its config, compute and param dtypes, attention kernel."""
  cfg: TowerConfig
  dtype: Dtype
  param_dtype: Dtype
  attention: str = "auto"          # the kernel (models/attention.py)


class LayerNorm(nn.Module):
  """LayerNorm as torch computes it (two-pass variance), in float32 whatever the compute dtype."""
  eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype).astype(jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype).astype(jnp.float32)
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return ((x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias).astype(self.dtype)


def _ln(cfg: TowerConfig, dtype, param_dtype, attention=None, name=None):
  del attention  # the tower's fields arrive together
  return LayerNorm(cfg.layer_norm_eps, dtype, param_dtype, name=name)


class Attention(_TowerModule):

  @nn.compact
  def __call__(self, x, causal: bool):
    c = self.cfg
    heads, width = c.num_attention_heads, c.hidden_size
    head_dim = width // heads
    in_std = width**-0.5 * (2 * c.num_hidden_layers) ** -0.5 * c.initializer_factor
    dense = functools.partial(nn.Dense, width, dtype=self.dtype, param_dtype=self.param_dtype)
    split = lambda t: t.reshape(t.shape[:-1] + (heads, head_dim))
    q = split(dense(kernel_init=_normal(in_std), name="q_proj")(x))
    k = split(dense(kernel_init=_normal(in_std), name="k_proj")(x))
    v = split(dense(kernel_init=_normal(in_std), name="v_proj")(x))
    out = attention_lib.attention(q, k, v, causal, self.attention).reshape(x.shape[:-1] + (width,))
    return dense(kernel_init=_normal(width**-0.5 * c.initializer_factor), name="out_proj")(out)


class MLP(_TowerModule):

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    f = c.initializer_factor
    h = nn.Dense(c.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=_normal((2 * c.hidden_size) ** -0.5 * f), name="fc1")(x)
    h = ACTIVATIONS[c.hidden_act](h)
    return nn.Dense(c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=_normal(c.hidden_size**-0.5 * (2 * c.num_hidden_layers) ** -0.5 * f),
                    name="fc2")(h)


class EncoderLayer(_TowerModule):

  @nn.compact
  def __call__(self, x, causal: bool):
    a = (self.cfg, self.dtype, self.param_dtype, self.attention)
    x = x + Attention(*a, name="self_attn")(_ln(*a, name="layer_norm1")(x), causal)
    return x + MLP(*a, name="mlp")(_ln(*a, name="layer_norm2")(x))


class Encoder(_TowerModule):

  @nn.compact
  def __call__(self, x, causal: bool = False):
    for i in range(self.cfg.num_hidden_layers):
      x = EncoderLayer(self.cfg, self.dtype, self.param_dtype, self.attention, name=f"layers_{i}")(x, causal)
    return x


class VisionEmbeddings(_TowerModule):

  @nn.compact
  def __call__(self, images):
    c = self.cfg
    std = c.initializer_range * c.initializer_factor
    cls = self.param("class_embedding", _normal(c.hidden_size**-0.5 * c.initializer_factor),
                     (c.hidden_size,), self.param_dtype)
    patches = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
                      padding="VALID", use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=_normal(std), name="patch_embedding")(images.astype(self.dtype))
    b = patches.shape[0]
    patches = patches.reshape(b, -1, c.hidden_size)  # row-major grid order, as torch flatten(2)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size)), patches], axis=1)
    pos = nn.Embed((c.image_size // c.patch_size) ** 2 + 1, c.hidden_size, dtype=self.dtype,
                   param_dtype=self.param_dtype, embedding_init=_normal(std), name="position_embedding")
    return x + pos(jnp.arange(x.shape[1]))[None]


class VisionTransformer(_TowerModule):

  @nn.compact
  def __call__(self, images):
    c = self.cfg
    if images.shape[1:] != (c.image_size, c.image_size, c.num_channels):
      raise ValueError(f"CLIP vision: images must be NHWC [B, {c.image_size}, {c.image_size}, "
                       f"{c.num_channels}], got {images.shape}")
    a = (c, self.dtype, self.param_dtype, self.attention)
    x = VisionEmbeddings(*a, name="embeddings")(images)
    x = _ln(*a, name="pre_layrnorm")(x)  # sic: transformers' spelling
    x = Encoder(*a, name="encoder")(x)
    return _ln(*a, name="post_layernorm")(x[:, 0])


class TextEmbeddings(_TowerModule):

  @nn.compact
  def __call__(self, ids):
    c = self.cfg
    embed = functools.partial(nn.Embed, features=c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                              embedding_init=_normal(0.02 * c.initializer_factor))
    x = embed(c.vocab_size, name="token_embedding")(ids)
    return x + embed(c.max_position_embeddings, name="position_embedding")(jnp.arange(ids.shape[-1]))[None]


class TextTransformer(_TowerModule):

  @nn.compact
  def __call__(self, ids):
    c = self.cfg
    if ids.shape[-1] > c.max_position_embeddings:
      raise ValueError(f"CLIP text: {ids.shape[-1]} tokens > max_position_embeddings "
                       f"{c.max_position_embeddings}")
    a = (c, self.dtype, self.param_dtype, self.attention)
    x = TextEmbeddings(*a, name="embeddings")(ids)
    x = Encoder(*a, name="encoder")(x, causal=True)
    return _ln(*a, name="final_layer_norm")(x)  # last hidden states [B, L, D]


def eos_position(ids, eos_token_id: int):
  """Where transformers 5 pools: legacy configs (eos_token_id == 2) take argmax of the ids (the
  end-of-text id is the largest in the vocabulary); others the first position equal to eos_token_id."""
  ids = jnp.asarray(ids)
  if eos_token_id == 2:
    return jnp.argmax(ids, axis=-1)
  return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIP(nn.Module):
  """Both towers (CLIPModel) or one tower with its projection (CLIP*ModelWithProjection) or without."""
  config: CLIPConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "auto"

  def setup(self):
    c = self.config
    if c.vision is not None:
      self.vision_model = VisionTransformer(c.vision, self.dtype, self.param_dtype, self.attention)
      if c.projection:
        self.visual_projection = nn.Dense(
            c.projection_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=_normal(c.vision.hidden_size**-0.5 * c.vision.initializer_factor))
    if c.text is not None:
      self.text_model = TextTransformer(c.text, self.dtype, self.param_dtype, self.attention)
      if c.projection:
        self.text_projection = nn.Dense(
            c.projection_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=_normal(c.text.hidden_size**-0.5 * c.text.initializer_factor))
    if c.vision is not None and c.text is not None:
      self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.logit_scale_init_value),
                                    (), self.param_dtype)

  def encode_image(self, images):
    pooled = self.vision_model(images)
    return self.visual_projection(pooled) if self.config.projection else pooled

  def text_hidden_states(self, ids):
    return self.text_model(ids)

  def encode_text(self, ids):
    h = self.text_model(ids)
    pooled = h[jnp.arange(h.shape[0]), eos_position(ids, self.config.text.eos_token_id)]
    return self.text_projection(pooled) if self.config.projection else pooled

  def __call__(self, images=None, ids=None):
    """Init entry point: touches every parameter of the towers present."""
    out = []
    if self.config.vision is not None:
      out.append(self.encode_image(images))
    if self.config.text is not None:
      out.append(self.encode_text(ids))
    if self.config.vision is not None and self.config.text is not None:
      out.append(self.logit_scale)
    return out

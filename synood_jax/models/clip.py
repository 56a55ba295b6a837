"""CLIP (ViT image tower + causal text transformer) in Flax Linen, loading Hugging Face checkpoints.

Module names follow transformers' `CLIPModel` (`vision_model/encoder/layers_0/self_attn/q_proj`, ...)
so `checkpoint_io` converts the state dict generically. Features: f = W_proj . pool(transformer(x)),
returned unnormalized (cosine similarity is the caller's business).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synood_jax import fileio
from synood_jax.models import attention as attention_lib, checkpoint_io, clip_preprocess, zero_shot as zero_shot_lib
from synood_jax.models.checkpoint_io import CheckpointError

Dtype = Any

# transformers' CLIPTextConfig / CLIPVisionConfig defaults: a config.json may leave any of them out.
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, projection_dim=512,
                     num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                     hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0,
                     initializer_range=0.02, initializer_factor=1.0, pad_token_id=1,
                     bos_token_id=49406, eos_token_id=49407, model_type="clip_text_model")
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, projection_dim=512, num_hidden_layers=12,
                       num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                       hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0,
                       initializer_range=0.02, initializer_factor=1.0, model_type="clip_vision_model")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json")

ACTIVATIONS: dict[str, Callable] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch's default gelu is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  """The fields of one tower that shape the computation (hashable: a static part of jitted code)."""
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  hidden_act: str
  layer_norm_eps: float
  initializer_range: float = 0.02
  initializer_factor: float = 1.0
  # vision only
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  # text only
  vocab_size: int = 49408
  max_position_embeddings: int = 77
  eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  vision: TowerConfig | None
  text: TowerConfig | None
  projection_dim: int
  logit_scale_init_value: float = 2.6592
  hf_json: str = "{}"  # the config.json it came from, written back by save_pretrained
  projection: bool = True  # False: a bare CLIPTextModel / CLIPVisionModel (e.g. Stable Diffusion's text encoder)

  @property
  def hf(self) -> dict:
    return json.loads(self.hf_json)


def _square(value, name: str, source: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise CheckpointError(f"{source}: non-square {name} {value} is not supported")
    value = value[0]
  return int(value)


def _tower(raw: dict, defaults: dict, kind: str, source: str) -> TowerConfig:
  cfg = {**defaults, **raw}
  act = cfg["hidden_act"]
  if act not in ACTIVATIONS:
    raise CheckpointError(f"{source}: {kind} hidden_act {act!r} not supported (have {sorted(ACTIVATIONS)})")
  eos = cfg.get("eos_token_id", 49407)
  if isinstance(eos, (list, tuple)):  # transformers' pooling compares ids with one eos id
    raise CheckpointError(f"{source}: text eos_token_id must be one integer, got {eos}")
  if cfg["hidden_size"] % cfg["num_attention_heads"]:
    raise CheckpointError(f"{source}: {kind} hidden_size {cfg['hidden_size']} is not a multiple of "
                          f"num_attention_heads {cfg['num_attention_heads']}")
  return TowerConfig(
      hidden_size=int(cfg["hidden_size"]), intermediate_size=int(cfg["intermediate_size"]),
      num_hidden_layers=int(cfg["num_hidden_layers"]), num_attention_heads=int(cfg["num_attention_heads"]),
      hidden_act=act, layer_norm_eps=float(cfg["layer_norm_eps"]),
      initializer_range=float(cfg.get("initializer_range", 0.02)),
      initializer_factor=float(cfg.get("initializer_factor", 1.0)),
      num_channels=int(cfg.get("num_channels", 3)),
      image_size=_square(cfg.get("image_size", 224), "image_size", source),
      patch_size=_square(cfg.get("patch_size", 32), "patch_size", source),
      vocab_size=int(cfg.get("vocab_size", 49408)),
      max_position_embeddings=int(cfg.get("max_position_embeddings", 77)),
      eos_token_id=int(eos if eos is not None else 49407))


def config_from_hf(hf: dict, source: str = "config.json", projection: bool = True) -> CLIPConfig:
  """A CLIPModel (model_type clip) or one tower (clip_vision_model / clip_text_model), with its
  projection (CLIP*ModelWithProjection) or without (CLIP*Model: `projection=False`)."""
  kind = hf.get("model_type", "clip")
  dump = json.dumps(hf, sort_keys=True)
  if kind == "clip_vision_model":
    return CLIPConfig(_tower(hf, VISION_DEFAULTS, "vision", source), None,
                      int(hf.get("projection_dim", 512)), hf_json=dump, projection=projection)
  if kind == "clip_text_model":
    return CLIPConfig(None, _tower(hf, TEXT_DEFAULTS, "text", source),
                      int(hf.get("projection_dim", 512)), hf_json=dump, projection=projection)
  if kind != "clip":
    raise CheckpointError(f"{source}: model_type {kind!r} is not a CLIP model "
                          "(want clip, clip_vision_model or clip_text_model)")
  # Old configs carry *_config_dict beside *_config; transformers lets the former win.
  text = {**(hf.get("text_config") or {}), **(hf.get("text_config_dict") or {})}
  vision = {**(hf.get("vision_config") or {}), **(hf.get("vision_config_dict") or {})}
  return CLIPConfig(_tower(vision, VISION_DEFAULTS, "vision", source),
                    _tower(text, TEXT_DEFAULTS, "text", source),
                    int(hf.get("projection_dim", 512)),
                    float(hf.get("logit_scale_init_value", 2.6592)), hf_json=dump)


# ---------------------------------------------------------------------------------------------
# Modules.

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


# ---------------------------------------------------------------------------------------------
# Bundle: config + module + params + tokenizer folder.

@functools.lru_cache(maxsize=8)
def load_tokenizer(folder: str):
  from transformers import CLIPTokenizer
  tok = CLIPTokenizer.from_pretrained(folder)
  # transformers builds a 2-token tokenizer instead of failing when the vocabulary did not load.
  if len(tok) <= 2:
    raise CheckpointError(f"{folder}: CLIPTokenizer loaded only {len(tok)} tokens (vocab.json / merges.txt "
                          "missing or unreadable)")
  return tok


def has_tokenizer(folder: str | None) -> bool:
  return bool(folder) and any(os.path.isfile(os.path.join(folder, f))
                              for f in ("vocab.json", "tokenizer.json"))


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, usable as a jit static
class CLIPBundle:
  config: CLIPConfig
  module: CLIP
  params: Any
  folder: str | None = None  # where tokenizer (and preprocessor) files live, if any

  # Pure functions of (params, inputs): jit them, shard them, differentiate them.
  def _need(self, tower: str):
    if getattr(self.config, tower) is None:
      raise ValueError(f"this CLIP bundle ({self.folder or 'in memory'}) has no {tower} tower")

  def encode_image(self, params, images_nhwc):
    """Projected, unnormalized image features [B, projection_dim] of NHWC preprocessed images
    (the pooled [B, hidden] output for a tower without projection)."""
    self._need("vision")
    return self.module.apply({"params": params}, images_nhwc, method=CLIP.encode_image)

  def encode_text(self, params, token_ids):
    """Projected, unnormalized text features [B, projection_dim] of int token ids [B, L], pooled at the
    end-of-text token (the pooled [B, hidden] output for a tower without projection)."""
    self._need("text")
    return self.module.apply({"params": params}, jnp.asarray(token_ids, jnp.int32), method=CLIP.encode_text)

  def text_hidden_states(self, params, token_ids):
    """Final-layer-normed last hidden states [B, L, hidden] (what Stable Diffusion conditions on)."""
    self._need("text")
    return self.module.apply({"params": params}, jnp.asarray(token_ids, jnp.int32),
                             method=CLIP.text_hidden_states)

  # Bound conveniences over self.params.
  def image_features(self, images_nhwc):
    self._need("vision")
    return _jit_encode_image(self.module, self.params, images_nhwc)

  def text_features(self, token_ids):
    self._need("text")
    return _jit_encode_text(self.module, self.params, jnp.asarray(token_ids, jnp.int32))

  @property
  def tokenizer(self):
    if not has_tokenizer(self.folder):
      raise CheckpointError(f"{self.folder}: no tokenizer files (vocab.json + merges.txt or tokenizer.json)")
    return load_tokenizer(self.folder)

  def tokenize(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
    """int32 [N, 77] ids: start token, text, end token, then the tokenizer's pad token."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    length = context_length or (self.config.text.max_position_embeddings if self.config.text else 77)
    tok = self.tokenizer
    ids = np.asarray(tok(texts, padding="max_length", max_length=length, truncation=True)["input_ids"],
                     np.int32).reshape(len(texts), length)
    vocab = self.config.text.vocab_size if self.config.text else None
    if vocab is not None and ids.size and ids.max() >= vocab:
      raise CheckpointError(f"{self.folder}: tokenizer id {int(ids.max())} >= model vocab_size {vocab}")
    return ids


# Static on the module (its config, no weights), not the bundle: the jit cache must not keep a bundle's
# params alive.
@functools.partial(jax.jit, static_argnums=0)
def _jit_encode_image(module, params, images):
  return module.apply({"params": params}, images, method=CLIP.encode_image)


@functools.partial(jax.jit, static_argnums=0)
def _jit_encode_text(module, params, ids):
  return module.apply({"params": params}, ids, method=CLIP.encode_text)


def _dummy_inputs(config: CLIPConfig):
  v, t = config.vision, config.text
  images = None if v is None else jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
  ids = None if t is None else jnp.zeros((1, t.max_position_embeddings), jnp.int32)
  return images, ids


def init_params(module: CLIP, seed: int = 0):
  images, ids = _dummy_inputs(module.config)
  return jax.jit(module.init)(jax.random.PRNGKey(seed), images, ids)["params"]


def abstract_params(module: CLIP):
  images, ids = _dummy_inputs(module.config)
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), images, ids)["params"]


_TOP = ("text_model.", "vision_model.", "text_projection.", "visual_projection.", "logit_scale")


def _renamer(config: CLIPConfig) -> Callable[[str], str | None]:
  # transformers 5 saves a bare CLIPTextModel / CLIPVisionModel without the `text_model.` /
  # `vision_model.` level that 4.x (and Stable Diffusion checkpoints) have: accept both.
  tower = "text_model." if config.vision is None else "vision_model." if config.text is None else ""

  def rename(key: str) -> str | None:
    if key.endswith("position_ids"):  # a buffer some checkpoints saved
      return None
    return key if not tower or key.startswith(_TOP) else tower + key
  return rename


def _has_projection(hf: dict, state: dict) -> bool:
  archs = hf.get("architectures") or []
  if any(a.endswith("WithProjection") or a == "CLIPModel" for a in archs):
    return True
  if any(a in ("CLIPTextModel", "CLIPVisionModel") for a in archs):
    return False
  return hf.get("model_type", "clip") == "clip" or any(
      k.startswith(("text_projection.", "visual_projection.")) for k in state)


def from_pretrained(path: str, dtype: Dtype = jnp.float32, param_dtype: Dtype | None = None,
                    tokenizer_path: str | None = None, attention: str = "auto") -> CLIPBundle:
  """Load a HF CLIPModel, CLIP{Vision,Text}ModelWithProjection or CLIP{Vision,Text}Model folder.

  `dtype` is the compute dtype and, unless `param_dtype` says otherwise, the param dtype.
  The tokenizer comes from `tokenizer_path` (e.g. a diffusers `tokenizer/` folder), else `path`.
  """
  hf = checkpoint_io.read_config(path)
  config = config_from_hf(hf, os.path.join(path, "config.json"))  # config errors before reading weights
  state, source = checkpoint_io.load_state_dict(path)
  config = dataclasses.replace(config, projection=_has_projection(hf, state))
  module = CLIP(config, dtype=dtype, param_dtype=param_dtype or dtype,
                attention=attention_lib.check_choice(attention))
  params = checkpoint_io.state_dict_to_params(state, abstract_params(module), source, rename=_renamer(config),
                                              place=checkpoint_io.to_device)
  if tokenizer_path is not None and not has_tokenizer(tokenizer_path):
    raise CheckpointError(f"{tokenizer_path}: no tokenizer files (vocab.json + merges.txt or tokenizer.json)")
  folder = tokenizer_path or path
  return CLIPBundle(config, module, params, folder if has_tokenizer(folder) else None)


def to_hf_config(config: CLIPConfig) -> dict:
  """config.json for transformers: the original one if any, with our fields written over it."""
  hf = config.hf

  def tower(t: TowerConfig, base: dict, defaults: dict, vision: bool) -> dict:
    out = {**defaults, **base}
    keys = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
            "layer_norm_eps", "initializer_range", "initializer_factor"]
    keys += ["num_channels", "image_size", "patch_size"] if vision else [
        "vocab_size", "max_position_embeddings", "eos_token_id"]
    out.update({k: getattr(t, k) for k in keys})
    out["projection_dim"] = config.projection_dim
    for k in ("text_config_dict", "vision_config_dict", "transformers_version", "architectures", "dtype"):
      out.pop(k, None)
    return out

  if config.text is None:
    out = tower(config.vision, hf, VISION_DEFAULTS, True)
    out["architectures"] = ["CLIPVisionModelWithProjection" if config.projection else "CLIPVisionModel"]
  elif config.vision is None:
    out = tower(config.text, hf, TEXT_DEFAULTS, False)
    out["architectures"] = ["CLIPTextModelWithProjection" if config.projection else "CLIPTextModel"]
  else:
    out = {k: v for k, v in hf.items() if k not in ("text_config_dict", "vision_config_dict")}
    out.update(model_type="clip", architectures=["CLIPModel"], projection_dim=config.projection_dim,
               logit_scale_init_value=config.logit_scale_init_value,
               text_config=tower(config.text, {**(hf.get("text_config") or {}),
                                               **(hf.get("text_config_dict") or {})}, TEXT_DEFAULTS, False),
               vision_config=tower(config.vision, {**(hf.get("vision_config") or {}),
                                                   **(hf.get("vision_config_dict") or {})},
                                   VISION_DEFAULTS, True))
  out["dtype"] = "float32"
  return out


def save_pretrained(bundle: CLIPBundle, path: str, params: Any = None) -> str:
  """Write config.json + model.safetensors (float32) that transformers' CLIP*.from_pretrained loads,
  plus the bundle's tokenizer / preprocessor files."""
  params = bundle.params if params is None else params
  checkpoint_io.write_config(path, to_hf_config(bundle.config))
  state = checkpoint_io.params_to_state_dict(jax.device_get(params))
  if not bundle.config.projection:  # transformers 5's bare-tower layout: no `text_model.` level
    state = {k.split(".", 1)[1]: v for k, v in state.items()}
  checkpoint_io.save_state_dict(path, state)
  if bundle.folder and os.path.abspath(bundle.folder) != os.path.abspath(path):
    for name in TOKENIZER_FILES:
      src = os.path.join(bundle.folder, name)
      if os.path.isfile(src):
        with open(src, "rb") as f:
          fileio.atomic_write(os.path.join(path, name), f.read())
  return path


def create(config: CLIPConfig, seed: int = 0, dtype: Dtype = jnp.float32, folder: str | None = None) -> CLIPBundle:
  """A randomly initialised bundle (our Flax init, CLIP's init scales)."""
  module = CLIP(config, dtype=dtype, param_dtype=dtype)
  return CLIPBundle(config, module, init_params(module, seed), folder)


# ---------------------------------------------------------------------------------------------
# Zero-shot classification in one call.

class ZeroShot(NamedTuple):
  logits: np.ndarray  # [N, C] exp(logit_scale) * cos(image, class), transformers' logits_per_image
  probs: np.ndarray   # [N, C] softmax over the classes


def zero_shot(bundle: CLIPBundle, images, class_names: Sequence[str],
              templates: Sequence[str] = ("a photo of a {}.",), params: Any = None,
              preprocessed: bool = False, batch_size: int = 256, mesh=None) -> ZeroShot:
  """CLIP zero-shot classification: logits = exp(logit_scale) * normalize(f_image(x)) . t_c^T, with
  t_c = normalize(mean_k normalize(f_text(template_k(c)))) (`zero_shot.class_text_features`).

  images: PIL images or uint8 HWC arrays (a list, or an NHWC uint8 array), preprocessed as transformers'
    CLIPImageProcessor with the folder's preprocessor_config.json (`clip_preprocess`); with
    `preprocessed=True`, an NHWC float32 batch that already is.
  templates: strings with a `{}` placeholder; one template gives transformers' CLIPModel
    `logits_per_image` for the prompts `template.format(c)`.
  params: the bundle's own unless given (e.g. sharded with `parallel.shard_params`); mesh: shard the
    batches over it. Returns numpy `ZeroShot(logits, probs)`.
  """
  params = bundle.params if params is None else params
  if "logit_scale" not in params:
    raise ValueError(f"zero_shot: this CLIP ({bundle.folder or 'in memory'}) has no logit_scale: it needs "
                     "both towers (a CLIPModel folder)")
  if preprocessed:
    x = np.asarray(images, np.float32)
  else:
    x = clip_preprocess.preprocess(images, clip_preprocess.load_config(bundle.folder))
  text = zero_shot_lib.class_text_features(bundle, params, class_names, templates, batch_size, mesh)
  feats = zero_shot_lib.image_features(bundle, params, x, batch_size, mesh)
  logits = np.exp(np.float32(np.asarray(params["logit_scale"], np.float32))) * (feats @ text.T)
  shifted = np.exp(logits - logits.max(-1, keepdims=True))
  return ZeroShot(logits, shifted / shifted.sum(-1, keepdims=True))

"""CLIP's face: `config`, `load`, `save` of a Hugging Face folder, and the bundle (config, module, params,
tokenizer folder) that the rest of the package encodes with.

  module, params = clip.load(folder, jnp.bfloat16, attention="auto")     # as unet / vae / resnet:
  clip.save(out, clip.config(folder), params)                             # config / load / save
  bundle = clip.from_pretrained(folder)                                   # + the tokenizer
  clip.save_pretrained(bundle, out)                                       # transformers loads `out`

The Flax modules are in `clip_modules.py`, the config.json handling in `clip_config.py`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from synood_jax import fileio
from synood_jax.models import attention as attention_lib, checkpoint_io
from synood_jax.models.checkpoint_io import CheckpointError
from synood_jax.models.clip_config import CLIPConfig, config_from_hf, to_hf_config
from synood_jax.models.clip_modules import CLIP

Dtype = Any
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json")


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


def config(folder: str) -> CLIPConfig:
  """A HF CLIPModel, CLIP{Vision,Text}ModelWithProjection or CLIP{Vision,Text}Model folder's config
  (whether it has projections: from its architectures, else from its weights' names)."""
  return _read(folder)[0]


def _read(folder: str):
  hf = checkpoint_io.read_config(folder)
  cfg = config_from_hf(hf, os.path.join(folder, "config.json"))  # config errors before reading weights
  state, source = checkpoint_io.load_state_dict(folder)  # lazy: tensors are read leaf by leaf
  return dataclasses.replace(cfg, projection=_has_projection(hf, state)), state, source


def load(folder: str, dtype: Dtype = jnp.float32, attention: str = "auto",
         param_dtype: Dtype | None = None) -> tuple[CLIP, Any]:
  """(module, params) of a HF CLIP folder. `dtype` is the compute dtype and, unless `param_dtype` says
  otherwise, the param dtype; `attention` the kernel (models/attention.py)."""
  cfg, state, source = _read(folder)
  module = CLIP(cfg, dtype=dtype, param_dtype=param_dtype or dtype, attention=attention_lib.check_choice(attention))
  params = checkpoint_io.state_dict_to_params(state, abstract_params(module), source, rename=_renamer(cfg),
                                              place=checkpoint_io.to_device)
  return module, params


def save(folder: str, config: CLIPConfig, params: Any) -> str:
  """config.json + model.safetensors (float32) that transformers' CLIP*.from_pretrained loads."""
  checkpoint_io.write_config(folder, to_hf_config(config))
  state = checkpoint_io.params_to_state_dict(jax.device_get(params))
  if not config.projection:  # transformers 5's bare-tower layout: no `text_model.` level
    state = {k.split(".", 1)[1]: v for k, v in state.items()}
  checkpoint_io.save_state_dict(folder, state)
  return folder


def from_pretrained(path: str, dtype: Dtype = jnp.float32, param_dtype: Dtype | None = None,
                    tokenizer_path: str | None = None, attention: str = "auto") -> CLIPBundle:
  """`load` plus the tokenizer: from `tokenizer_path` (e.g. a diffusers `tokenizer/` folder), else `path`."""
  module, params = load(path, dtype, attention, param_dtype)
  if tokenizer_path is not None and not has_tokenizer(tokenizer_path):
    raise CheckpointError(f"{tokenizer_path}: no tokenizer files (vocab.json + merges.txt or tokenizer.json)")
  folder = tokenizer_path or path
  return CLIPBundle(module.config, module, params, folder if has_tokenizer(folder) else None)


def save_pretrained(bundle: CLIPBundle, path: str, params: Any = None) -> str:
  """`save` plus the bundle's tokenizer / preprocessor files."""
  save(path, bundle.config, bundle.params if params is None else params)
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

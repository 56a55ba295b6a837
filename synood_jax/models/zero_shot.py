"""Zero-shot CLIP: classifier weights, image features and classification in one call.

t_c = normalize(mean_k normalize(f_text(template_k(class_c)))), as CLIP's zero-shot ImageNet recipe;
image features are normalize(f_image(x)), computed with the batch sharded over the mesh;
logits = exp(logit_scale) * normalize(f_image(x)) . t_c^T.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from synood_jax import parallel
from synood_jax.models import clip_preprocess
from synood_jax.progress import Progress


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
  """torch.nn.functional.normalize in float32: x / max(||x||, eps)."""
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


# Static on the CLIP module (config only), not the bundle: the jit cache must not keep a bundle's params
# alive after its caller is done with them.
@functools.partial(jax.jit, static_argnums=0)
def _text_features(module, params, ids):
  return l2_normalize(module.apply({"params": params}, ids, method="encode_text"))


@functools.partial(jax.jit, static_argnums=0)
def _image_features(module, params, images):
  return l2_normalize(module.apply({"params": params}, images, method="encode_image"))


@functools.partial(jax.jit, static_argnums=0)
def _raw_image_features(module, params, images):
  return module.apply({"params": params}, images, method="encode_image").astype(jnp.float32)


def _batched(fn, bundle, params, x: np.ndarray, batch_size: int, mesh: Mesh | None,
             name: str = "encode") -> np.ndarray:
  """fn over fixed-size batches (one compiled shape), the last one padded; rows sharded over `mesh`.
  Every process passes the same `x`; each puts only its own rows of a batch on its devices (a global
  batch, as synthesis builds) and gets every row's result back. Several batches log progress
  (items/s and an ETA counted after the first, compiling, batch)."""
  multiple = 1 if mesh is None else parallel.batch_size_multiple(mesh)
  # Round up so every device gets equal rows; no bigger than the (rounded) input needs.
  batch_size = min(parallel.ceil_div(batch_size, multiple), parallel.ceil_div(len(x), multiple) or 1) * multiple
  if mesh is not None:
    params = parallel.place_params(params, mesh)
  out = []
  progress = Progress(len(x), name=name, unit="items", every_secs=10) if len(x) > batch_size else None
  for start in range(0, len(x), batch_size):
    chunk, n = parallel.pad_batch(x[start:start + batch_size], batch_size)
    chunk = (parallel.global_batch(chunk[parallel.process_rows(batch_size)], mesh) if mesh is not None
             else jnp.asarray(chunk))
    out.append(parallel.to_host(fn(bundle.module, params, chunk))[:n])
    if progress is not None and start == 0:
      progress.restart(done=n)  # the first batch compiled: the pace counts from its end
    elif progress is not None:
      progress.update(n)
  return np.concatenate(out) if out else np.zeros((0, bundle.config.projection_dim), np.float32)


def encode_global_batch(bundle, params, images: jax.Array, mesh: Mesh, normalize: bool = True) -> jax.Array:
  """Image features of one global batch (`parallel.global_batch`), rows sharded as they came."""
  fn = _image_features if normalize else _raw_image_features
  return fn(bundle.module, parallel.place_params(params, mesh), images)


def class_text_features(bundle, params, classnames: Sequence[str], templates: Sequence[str],
                        batch_size: int = 256, mesh: Mesh | None = None) -> np.ndarray:
  """L2-normalized [C, D] class embeddings: each template filled with the class name (`{}` or
  `{c}` placeholder), features normalized, averaged over templates, renormalized."""
  if not classnames or not templates:
    raise ValueError("class_text_features: need at least one class name and one template")
  bad = [t for t in templates if "{}" not in t and "{c}" not in t]
  if bad:
    raise ValueError(f"class_text_features: templates without a '{{}}' placeholder: {bad[:3]}")
  prompts = [t.format(c) if "{}" in t else t.format(c=c) for c in classnames for t in templates]
  ids = bundle.tokenize(prompts)
  feats = _batched(_text_features, bundle, params, ids, batch_size, mesh, name=f"text encoder: {len(prompts)} prompts")
  feats = feats.reshape(len(classnames), len(templates), -1).mean(axis=1)
  return np.asarray(l2_normalize(feats))


def image_features(bundle, params, images: np.ndarray, batch_size: int = 256,
                   mesh: Mesh | None = None, normalize: bool = True) -> np.ndarray:
  """[N, D] features of preprocessed NHWC images: L2-normalized, or the raw projected embeddings
  (`normalize=False`; SynOOD's projection takes those as input)."""
  fn = _image_features if normalize else _raw_image_features
  return _batched(fn, bundle, params, np.asarray(images, np.float32), batch_size, mesh)


def encode_prompts(bundle, params, prompts: Sequence[str], batch_size: int, mesh: Mesh | None = None) -> np.ndarray:
  """L2-normalised features [N, D] of exact prompts (one template '{}', so no ensembling)."""
  return class_text_features(bundle, params, list(prompts), ["{}"], batch_size, mesh=mesh)


class ZeroShot(NamedTuple):
  logits: np.ndarray  # [N, C] exp(logit_scale) * cos(image, class), transformers' logits_per_image
  probs: np.ndarray   # [N, C] softmax over the classes


def zero_shot(bundle, images, class_names: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
              params: Any = None, preprocessed: bool = False, batch_size: int = 256, mesh=None) -> ZeroShot:
  """CLIP zero-shot classification: logits = exp(logit_scale) * normalize(f_image(x)) . t_c^T, with
  t_c = normalize(mean_k normalize(f_text(template_k(c)))) (`class_text_features`).

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
  text = class_text_features(bundle, params, class_names, templates, batch_size, mesh)
  feats = image_features(bundle, params, x, batch_size, mesh)
  logits = np.exp(np.float32(np.asarray(params["logit_scale"], np.float32))) * (feats @ text.T)
  shifted = np.exp(logits - logits.max(-1, keepdims=True))
  return ZeroShot(logits, shifted / shifted.sum(-1, keepdims=True))

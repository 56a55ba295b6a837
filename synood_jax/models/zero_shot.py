"""Zero-shot CLIP classifier weights and image features.

t_c = normalize(mean_k normalize(f_text(template_k(class_c)))), as CLIP's zero-shot ImageNet recipe;
image features are normalize(f_image(x)), computed with the batch sharded over the mesh.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from synood_jax import parallel
from synood_jax.progress import Progress


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
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
  batch_size = min(-(-batch_size // multiple), -(-len(x) // multiple) or 1) * multiple
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


__all__ = ["class_text_features", "encode_global_batch", "image_features", "l2_normalize"]

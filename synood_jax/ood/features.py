"""Raw CLIP image features of an image set: f(x) = W_proj . pool(ViT(preprocess(x))), not normalised.

The one image encoder of the package (the evaluation, the pipeline's features and export stages):
each process reads and encodes only its rows of every global batch, the batch runs over the whole mesh,
one all-gather gives every process all rows in record order. Cached on disk as npz keyed by (set
fingerprint, model folder and its weights, preprocessing, dtype).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import time
from typing import Callable

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from synood_jax import fileio, parallel, runtime
from synood_jax.data import datasets as data, loader as loader_lib
from synood_jax.models import clip_preprocess, zero_shot
from synood_jax.progress import Progress


@dataclasses.dataclass
class Features:
  features: np.ndarray        # float32 [n, D], raw projected embeddings (not normalised: SynOOD's
                              # projection takes them as they are), rows for the readable records
  labels: np.ndarray          # int64 [n]
  indices: np.ndarray         # int64 [n]: record index of each row
  failures: list[dict]        # [{path, error}] records that could not be read (left out)
  cache_path: str = ""


def make_preprocess(clip_path: str, image_size: int) -> tuple[Callable, str]:
  """(PIL image -> float32 HWC, an id string of the preprocessing for cache keys), from the model
  folder's preprocessor_config.json (CLIPImageProcessor's defaults without one)."""
  cfg = clip_preprocess.load_config(clip_path)
  if cfg.do_center_crop and (cfg.crop_height, cfg.crop_width) != (image_size, image_size):
    raise ValueError(f"{clip_path}: preprocessing crops {cfg.crop_height}x{cfg.crop_width}, the model takes "
                     f"{image_size}x{image_size}")
  return functools.partial(clip_preprocess.preprocess_image, config=cfg), json.dumps(
      dataclasses.asdict(cfg), sort_keys=True)


# ------------------------------------------------------------------------------------------------
# The on-disk cache.

def model_fingerprint(clip_path: str) -> str:
  """The model folder (absolute) plus size and mtime of its config and weight files."""
  path = os.path.abspath(clip_path)
  h = hashlib.sha256(path.encode())
  if os.path.isdir(path):
    for f in sorted(os.listdir(path)):
      if f.endswith((".json", ".safetensors", ".bin", ".msgpack", ".npz", ".pth", ".pt")):
        st = os.stat(os.path.join(path, f))
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
  return h.hexdigest()


def cache_key(dataset: data.Dataset, model_fp: str, preprocess_id: str, dtype: str) -> str:
  key = json.dumps({"set": dataset.fingerprint(), "model": model_fp, "preprocess": preprocess_id,
                    "dtype": dtype, "features": "raw"}, sort_keys=True)
  return hashlib.sha256(key.encode()).hexdigest()


def load_cached(path: str) -> Features | None:
  if not fileio.exists(path):
    return None
  with fileio.open_file(path) as f, np.load(io.BytesIO(f.read()), allow_pickle=False) as z:
    failures = json.loads(str(z["failures"]))
    return Features(z["features"], z["labels"], z["indices"], failures, path)


def save_cached(path: str, out: Features, name: str) -> None:
  """Process 0 writes the cache (every process holds the same gathered features)."""
  fileio.atomic_write(path, lambda f: np.savez(
      f, features=out.features, labels=out.labels, indices=out.indices,
      failures=np.asarray(json.dumps(out.failures)), name=np.asarray(name)))


# ------------------------------------------------------------------------------------------------
# Extraction.

def extract_features(bundle, params, dataset: data.Dataset, preprocess: Callable, *, batch_size: int,
                     mesh=None, cache_path: str | None = None, num_threads: int | None = None) -> Features:
  """Image features of every readable record (`encode_process_slices`); unreadable records are listed
  in `failures` (and logged), never dropped silently. With `cache_path`: read from there if process 0
  finds it (then every process reads it: one decision for all), else written there by process 0."""
  if cache_path and runtime.agreed(fileio.exists(cache_path)):
    logging.info("%s: features from cache %s", dataset.name, cache_path)
    return load_cached(cache_path)
  out = encode_process_slices(bundle, params, dataset, preprocess, batch_size=batch_size, mesh=mesh,
                              num_threads=num_threads)
  if cache_path:
    out.cache_path = cache_path
    if fileio.is_writer():
      save_cached(cache_path, out, dataset.name)
  return out


def process_records(num_records: int, batch_size: int) -> np.ndarray:
  """The record indices this process reads: its rows (`parallel.process_rows`) of every global batch
  of `batch_size` records."""
  rows = parallel.process_rows(batch_size)
  idx = (np.arange(0, num_records, batch_size)[:, None] + np.arange(rows.start, rows.stop)[None, :]).reshape(-1)
  return idx[idx < num_records]


def encode_process_slices(bundle, params, dataset: data.Dataset, preprocess: Callable, *, batch_size: int,
                          mesh=None, num_threads: int | None = None) -> Features:
  """Raw image features of a set, each process reading and encoding only its own slice.

  Global batch k holds records [k B, (k + 1) B); process p loads rows [p B/P, (p + 1) B/P) of it,
  the batch is encoded over the whole mesh, and p keeps its rows' features. Unreadable or missing
  rows are zeros marked invalid (one compiled shape, no row depends on another). One all-gather at the
  end gives every process all rows, in record order: the same result as one process with B rows.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  batch_size = parallel.round_up(batch_size, parallel.batch_size_multiple(mesh))  # equal rows per device
  local, n_batches = batch_size // jax.process_count(), parallel.ceil_div(len(dataset), batch_size)
  mine = process_records(len(dataset), batch_size)
  loader = loader_lib.ImageLoader(dataclasses.replace(dataset, records=[dataset.records[i] for i in mine]), local,
                            preprocess, num_threads=num_threads)
  size = bundle.config.vision.image_size
  feats = np.zeros((n_batches, local, bundle.config.projection_dim), np.float32)
  valid = np.zeros((n_batches, local), bool)
  start = time.perf_counter()
  progress = Progress(len(mine), name=f"features {dataset.name}", unit="img", every_secs=10)
  batches = iter(loader)
  batch = next(batches, None)
  for k in range(n_batches):  # the loader skips batches with no readable image: match by index
    images = np.zeros((local, size, size, 3), np.float32)
    if batch is not None and batch["index"][0] // local == k:
      rows = batch["index"] - k * local
      images[rows], valid[k, rows] = batch["image"], True
      batch = next(batches, None)
    out = zero_shot.encode_global_batch(bundle, params, parallel.global_batch(images, mesh), mesh, normalize=False)
    feats[k] = parallel.host_rows(out, mesh)
    n = min(local, len(mine) - k * local)
    if k == 0:
      progress.restart(done=n)  # the first batch compiled: the pace counts from its end
    else:
      progress.update(n)
  failures = [dict(index=int(mine[f.index]), path=f.path, error=f.error) for f in loader.failures]
  feats, valid = _gather_in_record_order(feats, valid)
  failures = sorted(sum(runtime.gather_json(failures), []), key=lambda f: f["index"])
  indices = np.flatnonzero(valid[:len(dataset)])
  if not indices.size:
    raise data.DataError(f"{dataset.name}: no readable image among {len(dataset)} records")
  logging.info("%s: %d images encoded in %.1f s over %d process(es) (%d unreadable)", dataset.name, indices.size,
               time.perf_counter() - start, jax.process_count(), len(failures))
  return Features(feats[indices], dataset.labels[indices], indices.astype(np.int64),
                  [{"path": f["path"], "error": f["error"]} for f in failures])


def _gather_in_record_order(feats: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """[n_batches, local, ...] per process -> [n_batches * B, ...] of all processes, row = record index."""
  if jax.process_count() > 1:  # [P, n_batches, local, ...] -> batch-major, then process, then row
    feats, valid = (np.swapaxes(np.asarray(multihost_utils.process_allgather(x)), 0, 1) for x in (feats, valid))
  return feats.reshape(-1, feats.shape[-1]), valid.reshape(-1)


def model_folder(bundle) -> str:
  """The CLIP's folder: its preprocessor_config.json, and its weights for the cache key."""
  if not bundle.folder:
    raise ValueError("evaluation: the CLIP bundle has no folder (load it with clip.from_pretrained): "
                     "its preprocessing and the feature cache key come from there")
  return bundle.folder


def dtype_name(bundle) -> str:
  return np.dtype(bundle.module.dtype).name


def encode_set(bundle, dataset: data.Dataset, *, params=None, batch_size: int = 256, mesh=None,
               cache_dir: str = "", num_threads: int | None = None) -> Features:
  """Raw image embeddings of a set's readable images (`extract_features`), preprocessed as the model
  folder says; cached under `cache_dir` (if given) by (set, model weights, preprocessing, dtype)."""
  folder = model_folder(bundle)
  preprocess, preprocess_id = make_preprocess(folder, bundle.config.vision.image_size)
  if mesh is not None:  # every device gets equal rows
    batch_size = parallel.round_up(batch_size, parallel.batch_size_multiple(mesh))
  cache_path = None
  if cache_dir:
    key = cache_key(dataset, model_fingerprint(folder), preprocess_id, dtype_name(bundle))
    cache_path = os.path.join(cache_dir, f"{dataset.name}-{key[:24]}.npz")
  return extract_features(bundle, bundle.params if params is None else params, dataset, preprocess,
                          batch_size=batch_size, mesh=mesh, cache_path=cache_path, num_threads=num_threads)

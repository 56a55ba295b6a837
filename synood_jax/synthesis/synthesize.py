"""Near-boundary OOD synthesis (SynOOD stage 1): sources -> in-painting + boundary refinement -> PNGs.

x_syn = D(z0),  z0 = Sampler(add_noise(E(x), eps_K, t0), "A photo only remain {context}.")

Writes `<out>/<class>/<name>_ood.png` and `<out>/manifest.jsonl`. Resumable: a PNG is written atomically
before its manifest line, a rerun skips sources with both, and the finished manifest is rewritten in
source order, so a run killed at any moment and rerun equals an uninterrupted one. Each image's noise
comes from (seed, source id), never from its place in a batch, so the device count and batch
composition do not change the result. Each record has a health `status` (`health.py`: ok, nonfinite,
degenerate, in_distribution); the run stops with the counts and the likely cause once too many images
cannot be ok. An unreadable source is skipped with a warning naming it.
"""
from __future__ import annotations

import functools
import json
import os
import zlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image

from synood_jax import parallel, runtime
from synood_jax.jsonl import read_jsonl
from synood_jax.synthesis import health, refinement
from synood_jax.diffusion import inpaint, schedulers
from synood_jax.models import vae as vae_lib
from synood_jax.progress import Progress


def source_id(relpath: str) -> int:
  """A stable 31-bit id of a source, from its path relative to the source root."""
  return zlib.crc32(relpath.replace(os.sep, "/").encode()) & 0x7FFFFFFF


def output_relpath(record: dict) -> str:
  stem = os.path.splitext(os.path.basename(record["path"]))[0]
  return os.path.join(record["class_name"], f"{stem}_ood.png")


def load_source_image(path: str, size: int) -> np.ndarray:
  """RGB resized to size x size (aspect not kept, as the official code), float32 in [-1, 1]."""
  with Image.open(path) as im:
    im = im.convert("RGB").resize((size, size), Image.BICUBIC)
    return np.asarray(im, np.float32) / 127.5 - 1.0


def _load_images(chunk: Sequence[tuple[dict, str]], root: str, size: int):
  """(images, the rows of `chunk` that could be read); an unreadable source is skipped with a warning
  naming it (the stage counts the sources missing from the manifest)."""
  images, kept = [], []
  for rec, prompt in chunk:
    path = os.path.join(root, rec["path"])
    try:
      images.append(load_source_image(path, size))
      kept.append((rec, prompt))
    except Exception as e:  # noqa: BLE001  PIL raises OSError, UnidentifiedImageError, SyntaxError...
      logging.warning("synthesis: skipping unreadable source %s (%s: %s)", path, type(e).__name__, e)
  return images, kept


# ---------------------------------------------------------------------------------------------
# The jitted per-batch program.

def synthesize_batch(pipe, refine_cfg: refinement.RefineConfig, steps: int, decode_chunk: int | None,
                     logits_fn: Callable, params: dict, images: jax.Array, ids: jax.Array,
                     prompt_ids: jax.Array, negative_ids: jax.Array, masked_latents: jax.Array,
                     first_index: jax.Array, guidance_scale: jax.Array, seed: jax.Array):
  """All K refinement iterations for one batch. params: {'unet','vae','text','classifier'}.

  `steps` (the scheduler table length) is static; the strength cut `first_index` and the guidance
  scale are traced. Each image's posterior sample and noise come from (seed, its source id).
  """
  key = jax.random.key(seed)
  keys = jax.vmap(lambda i: (jax.random.fold_in(jax.random.fold_in(key, 0), i),
                             jax.random.fold_in(jax.random.fold_in(key, 1), i)))
  k_src, k_eps = keys(ids)
  mean, logvar = pipe.vae_encode(params["vae"], images)
  mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
  z_in = jax.vmap(vae_lib.vae_sample)(mean, logvar, k_src) * pipe.scaling_factor
  eps = jax.vmap(lambda k: jax.random.normal(k, z_in.shape[1:], jnp.float32))(k_eps)

  cond = pipe.text_hidden(params["text"], prompt_ids)
  uncond = jnp.broadcast_to(pipe.text_hidden(params["text"], negative_ids), cond.shape)
  mask = jnp.ones(z_in.shape[:-1] + (1,), jnp.float32)
  masked = jnp.broadcast_to(masked_latents, z_in.shape)
  t0 = jnp.asarray(inpaint.timestep_table(pipe.scheduler, steps))[first_index]

  def noise_fn(e):
    return schedulers.add_noise(pipe.scheduler, z_in, e, jnp.full((e.shape[0],), t0))

  def sample_fn(p, z_t):
    return inpaint.sample_latents(pipe.unet, pipe.scheduler, p["unet"], z_t, cond, uncond, mask, masked,
                                  guidance_scale, steps, first_index, image_latents=z_in, noise=z_t,
                                  remat=refine_cfg.grad_mode == "exact")

  def decode_fn(p, z0):
    return inpaint.decode_images(pipe.vae_decode, p["vae"], z0, pipe.scaling_factor, decode_chunk)

  def classify(p, x):
    return logits_fn(p["classifier"], x)

  return refinement.refine(refine_cfg, noise_fn, sample_fn, decode_fn, classify, params, eps)


@functools.lru_cache(maxsize=8)
def jitted_batch_fn(pipe, refine_cfg: refinement.RefineConfig, steps: int, decode_chunk: int | None,
                    logits_fn: Callable):
  """One jitted `synthesize_batch` per (pipeline, refinement, steps, chunk, classifier): calls for
  several source sets (or a resumed run in the same process) reuse its compiled program."""
  return jax.jit(functools.partial(synthesize_batch, pipe, refine_cfg, steps, decode_chunk, logits_fn))


def masked_image_latents(pipe, vae_params, size: int) -> jax.Array:
  """Latents of the all-zero masked image (the mask covers everything): the posterior mean, scaled.

  The official pipeline samples this posterior on every call; the mean is its deterministic choice.
  """
  zeros = jnp.zeros((1, size, size, 3), jnp.float32)
  mean, _ = pipe.vae_encode(vae_params, zeros)
  return mean.astype(jnp.float32) * pipe.scaling_factor


# ---------------------------------------------------------------------------------------------
# Manifest and resume.

def read_manifest(path: str) -> dict[str, dict]:
  """Manifest records by source path; a torn last line (killed mid-write) is dropped, any other bad
  line raises (the next stage would otherwise train on fewer images without a word)."""
  return {rec["source"]: rec for rec in read_jsonl(path, required=("source", "output"))}


def _remove_stale_temp_files(out_dir: str) -> None:
  """PNGs half-written by a killed process (`*.png.tmp<pid>`) are dropped before a rerun."""
  for folder, _, files in os.walk(out_dir):
    for f in files:
      if ".png.tmp" in f:
        os.remove(os.path.join(folder, f))


def _atomic_png(pixels: np.ndarray, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  Image.fromarray(pixels).save(tmp, format="PNG")
  os.replace(tmp, path)


def _rewrite_manifest(path: str, records: dict[str, dict], order: Sequence[str]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for src in order:
      if src in records:
        f.write(json.dumps(records[src], sort_keys=True) + "\n")
  os.replace(tmp, path)


def _global_counts(statuses) -> dict[str, int]:
  """Status counts over every process (each process judges the same numbers, so all stop together)."""
  c = health.counts(statuses)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    total = np.sum(multihost_utils.process_allgather(np.array([c[s] for s in health.STATUSES])), axis=0)
    c = {s: int(v) for s, v in zip(health.STATUSES, total)}
  return c


def synthesize(config, out_dir: str, pipe, params: dict, logits_fn: Callable, source_root: str,
               sources: Sequence[dict], prompts: Sequence[str], mesh) -> list[dict]:
  """Synthesize one image per source (with prompt) into out_dir; returns the manifest records.

  config: image_size, steps, strength, guidance_scale, seed, batch_size (global), band, and the
  refinement fields iterations, step_size, target, loss, grad_mode, reference_batch.
  """
  os.makedirs(out_dir, exist_ok=True)
  _remove_stale_temp_files(out_dir)
  manifest_path = os.path.join(out_dir, f"manifest.{jax.process_index()}.jsonl"
                               if jax.process_count() > 1 else "manifest.jsonl")
  done = {s: r for s, r in read_manifest(manifest_path).items()
          if os.path.exists(os.path.join(out_dir, r["output"]))}
  if len(done) < len(read_manifest(manifest_path)):
    _rewrite_manifest(manifest_path, done, list(done))
  mine = [(r, p) for i, (r, p) in enumerate(zip(sources, prompts))
          if i % jax.process_count() == jax.process_index()]
  todo = [(r, p) for r, p in mine if r["path"] not in done]
  logging.info("synthesis: %d sources for this process, %d done, %d to go", len(mine), len(done), len(todo))

  refine_cfg = refinement.RefineConfig(
      iterations=config.iterations, step_size=config.step_size, target=config.target,
      loss=config.loss, grad_mode=config.grad_mode, reference_batch=config.get("reference_batch", 1))
  first_index = jnp.int32(inpaint.start_index(pipe.scheduler, config.steps, config.strength))

  local_batch = config.batch_size // jax.process_count()
  multiple = parallel.batch_size_multiple(mesh) // jax.process_count()
  if local_batch % max(multiple, 1):
    raise ValueError(f"synthesis.batch_size {config.batch_size} is not a multiple of the "
                     f"{parallel.batch_size_multiple(mesh)} devices")
  n_batches = -(-len(todo) // local_batch)
  if jax.process_count() > 1:  # every process must run the same number of collective steps
    from jax.experimental import multihost_utils
    n_batches = int(np.max(multihost_utils.process_allgather(np.array(n_batches))))

  negative_ids = jnp.asarray(pipe.tokenize([""]))
  masked = masked_image_latents(pipe, params["vae"], config.image_size)
  step_fn = jitted_batch_fn(pipe, refine_cfg, config.steps, config.get("decode_chunk") or None, logits_fn)
  progress = Progress(total=len(mine), initial=len(mine) - len(todo), name="synthesis", unit="img",
                      every_secs=config.get("log_every_secs", 30))
  monitor = health.Monitor(config, len(sources), manifest_path, [health.status_of(r) for r in done.values()])
  monitor.check(c=_global_counts(monitor.statuses))  # a resumed run that already failed stops at once
  with open(manifest_path, "a") as manifest:
    for b in range(n_batches):
      images, chunk = _load_images(todo[b * local_batch:(b + 1) * local_batch], source_root, config.image_size)
      n_real = len(chunk)
      if n_real == 0:  # an idle process (or a batch of unreadable files) takes part with a dummy row
        chunk, images = mine[:1], [np.zeros((config.image_size, config.image_size, 3), np.float32)]
      images = np.stack(images)
      ids = np.array([source_id(r["path"]) for r, _ in chunk], np.int32)
      prompt_ids = np.asarray(pipe.tokenize([p for _, p in chunk]))
      (images, _), (ids, _), (prompt_ids, _) = (parallel.pad_batch(x, local_batch)
                                                for x in (images, ids, prompt_ids))
      batch = parallel.global_batch((images, ids, prompt_ids), mesh)
      args = (params, *batch, negative_ids, masked, first_index, jnp.float32(config.guidance_scale),
              jnp.uint32(config.seed))
      if b == 0:  # compile once, timed apart from the run; every batch has these shapes
        step_fn = runtime.compile_ahead(step_fn, *args, what="synthesis: compile")
        progress.restart()  # items/s and the ETA count from here, not from before the compile
      out, scores, losses, _, steps_finite = step_fn(*args)
      out, scores, losses, steps_finite = parallel.to_host((out, scores, losses, steps_finite))
      offset = jax.process_index() * local_batch if jax.process_count() > 1 else 0
      rows = slice(offset, offset + n_real)
      statuses = health.classify_batch(out[rows], scores[:, rows], steps_finite[rows], target=config.target,
                                       band=config.band, min_pixel_std=config.get("min_pixel_std", 0.01))
      for j in range(n_real):
        rec, prompt = chunk[j]
        pixels = np.round(np.nan_to_num(out[offset + j]) * 255).astype(np.uint8)
        s = [float(v) for v in scores[:, offset + j]]
        entry = {"source": rec["path"], "class_name": rec["class_name"], "class_index": rec["class_index"],
                 "output": output_relpath(rec), "prompt": prompt, "seed": int(config.seed),
                 "source_id": int(ids[j]), "scores": s, "losses": [float(v) for v in losses[:, offset + j]],
                 "in_band": abs(s[-1] - config.target) <= config.band,
                 "stayed_in_distribution": s[-1] < config.target - config.band, "status": statuses[j]}
        _atomic_png(pixels, os.path.join(out_dir, entry["output"]))
        manifest.write(json.dumps(entry, sort_keys=True) + "\n")
        manifest.flush()
        done[rec["path"]] = entry
      progress.update(n_real, extra=", ".join(f"{k} {v}" for k, v in health.counts(statuses).items() if v))
      monitor.add(statuses)
      monitor.check(c=_global_counts(monitor.statuses))
  _rewrite_manifest(manifest_path, done, [r["path"] for r, _ in mine])
  if jax.process_count() > 1:  # one manifest.jsonl in source order, as a single-host run writes
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("synthesis manifests written")
    if jax.process_index() == 0:
      merged = {}
      for i in range(jax.process_count()):
        merged.update(read_manifest(os.path.join(out_dir, f"manifest.{i}.jsonl")))
      _rewrite_manifest(os.path.join(out_dir, "manifest.jsonl"), merged, [r["path"] for r in sources])
    multihost_utils.sync_global_devices("synthesis manifest merged")
  monitor.check(final=True, c=_global_counts(monitor.statuses))  # also when a rerun had nothing to do
  return [done[r["path"]] for r, _ in mine if r["path"] in done]

"""Near-boundary OOD synthesis (SynOOD stage 1): sources -> in-painting + boundary refinement -> PNGs.

x_syn = D(z0),  z0 = Sampler(add_noise(E(x), eps_K, t0), "A photo only remain {context}.")

Writes `<out>/<class>/<name>_ood.png` and `<out>/manifest.jsonl`. Resumable: a PNG is written atomically
before its manifest line, a rerun skips sources with both, and the finished manifest is rewritten in
source order, so a run killed at any moment and rerun equals an uninterrupted one. Each image's noise
comes from (seed, source id), never from its place in a batch, so the device count and batch
composition do not change the result. Several processes share the work (`synthesize`); a run killed
with one process count resumes with another, since the resume state is the union of every manifest.
Each record has a health `status` (`health.py`: ok, nonfinite, degenerate, in_distribution); the run
stops with the counts and the likely cause once too many images cannot be ok. An unreadable source is
skipped with a warning naming it.
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

from synood_jax import fileio, parallel, runtime
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


def process_manifest(out_dir: str, process: int) -> str:
  """The manifest a process appends to while it runs; on one process it is manifest.jsonl itself."""
  return os.path.join(out_dir, f"manifest.{process}.jsonl")


def _process_manifests(out_dir: str) -> list[str]:
  """Every per-process manifest in out_dir: also those of an earlier run with another process count."""
  names = fileio.path(out_dir).glob("manifest.*.jsonl") if fileio.exists(out_dir) else []
  return sorted(os.path.join(out_dir, p.name) for p in names)


def consolidate(out_dir: str, order: Sequence[str], check_outputs: bool = False) -> dict[str, dict]:
  """Process 0 only, while no process synthesizes: the union of manifest.jsonl and every
  manifest.<i>.jsonl (records whose PNG exists, with `check_outputs`) is written to manifest.jsonl in
  source order, then the per-process manifests and the temporary files killed writers left are removed.

  Whatever killed which process of whichever process count, the union holds each finished image once,
  so a rerun with any number of processes only synthesizes what is missing.
  """
  path = os.path.join(out_dir, "manifest.jsonl")
  parts = _process_manifests(out_dir)
  records = read_manifest(path)
  for part in parts:
    records.update(read_manifest(part))
  if check_outputs:
    records = {s: r for s, r in records.items() if fileio.exists(os.path.join(out_dir, r["output"]))}
  fileio.atomic_write(path, "".join(json.dumps(records[s], sort_keys=True) + "\n" for s in order if s in records))
  for part in parts:
    fileio.path(part).unlink()
  fileio.remove_temp_files(out_dir)
  return records


def _write_png(pixels: np.ndarray, path: str) -> None:
  fileio.atomic_write(path, lambda f: Image.fromarray(pixels).save(f, format="PNG"), per_process=True)


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
  """Synthesize one image per source (with prompt) into out_dir; returns every source's manifest record
  (all processes', in source order).

  config: image_size, steps, strength, guidance_scale, seed, batch_size (global), band, and the
  refinement fields iterations, step_size, target, loss, grad_mode, reference_batch.

  Every process runs this with the same sources. Process 0 first folds what earlier (maybe killed)
  runs left into manifest.jsonl; then the sources not in it are dealt round-robin to the processes,
  each writes its own PNGs and appends to its own manifest.<process>.jsonl, and process 0 merges them.
  """
  nproc, me = jax.process_count(), jax.process_index()
  order = [r["path"] for r in sources]
  manifest_path = os.path.join(out_dir, "manifest.jsonl")
  if fileio.is_writer():
    consolidate(out_dir, order, check_outputs=True)
  runtime.barrier(f"synthesis {out_dir}: resume state merged")
  done = read_manifest(manifest_path)
  todo = [(r, p) for r, p in zip(sources, prompts) if r["path"] not in done]
  mine = todo[me::nproc]
  logging.info("synthesis: %d sources, %d done, %d to go (%d for process %d)", len(sources), len(done),
               len(todo), len(mine), me)

  local_batch = config.batch_size // nproc
  multiple = parallel.batch_size_multiple(mesh) // nproc
  if config.batch_size % nproc or local_batch % max(multiple, 1):
    raise ValueError(f"synthesis.batch_size {config.batch_size} is not a multiple of the "
                     f"{parallel.batch_size_multiple(mesh)} devices")
  # Statuses so far: the finished images counted once (on process 0), each new one by its process.
  monitor = health.Monitor(config, len(sources), manifest_path,
                           [health.status_of(r) for r in done.values()] if me == 0 else [])
  monitor.check(c=_global_counts(monitor.statuses))  # a resumed run that already failed stops at once
  # The same on every process (each has ceil or floor of len(todo) / nproc sources): every process
  # runs the same number of collective steps.
  n_batches = -(-(-(-len(todo) // nproc)) // local_batch)
  if n_batches:
    own_manifest = manifest_path if nproc == 1 else process_manifest(out_dir, me)
    _synthesize_batches(config, out_dir, pipe, params, logits_fn, source_root, mine, todo[0], local_batch,
                        n_batches, own_manifest, monitor, mesh)
  runtime.barrier(f"synthesis {out_dir}: every process finished")
  if fileio.is_writer():
    consolidate(out_dir, order)
  runtime.barrier(f"synthesis {out_dir}: manifest merged")
  monitor.check(final=True, c=_global_counts(monitor.statuses))  # also when a rerun had nothing to do
  merged = read_manifest(manifest_path)
  return [merged[s] for s in order if s in merged]


def _synthesize_batches(config, out_dir: str, pipe, params: dict, logits_fn: Callable, source_root: str,
                        mine: Sequence[tuple[dict, str]], filler: tuple[dict, str], local_batch: int,
                        n_batches: int, own_manifest: str, monitor: health.Monitor, mesh) -> None:
  """This process's sources, `local_batch` rows of each global batch; `filler` stands in (a blank
  image) for a process with fewer (or no readable) sources left, so that it still takes part in
  every collective step."""
  refine_cfg = refinement.RefineConfig(
      iterations=config.iterations, step_size=config.step_size, target=config.target,
      loss=config.loss, grad_mode=config.grad_mode, reference_batch=config.get("reference_batch", 1))
  first_index = jnp.int32(inpaint.start_index(pipe.scheduler, config.steps, config.strength))
  negative_ids = jnp.asarray(pipe.tokenize([""]))
  masked = masked_image_latents(pipe, params["vae"], config.image_size)
  step_fn = jitted_batch_fn(pipe, refine_cfg, config.steps, config.get("decode_chunk") or None, logits_fn)
  progress = Progress(total=len(mine), name="synthesis", unit="img", every_secs=config.get("log_every_secs", 30))
  offset = jax.process_index() * local_batch  # this process's rows of the global batch (parallel.make_mesh)
  with fileio.LineLog(own_manifest, per_process=jax.process_count() > 1) as manifest:
    for b in range(n_batches):
      images, chunk = _load_images(mine[b * local_batch:(b + 1) * local_batch], source_root, config.image_size)
      n_real = len(chunk)
      if n_real == 0:
        chunk, images = [filler], [np.zeros((config.image_size, config.image_size, 3), np.float32)]
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
      rows = slice(offset, offset + n_real)
      statuses = health.classify_batch(out[rows], scores[:, rows], steps_finite[rows], target=config.target,
                                       band=config.band, min_pixel_std=config.get("min_pixel_std", 0.01))
      for j in range(n_real):
        rec, prompt = chunk[j]
        row = offset + j
        pixels = np.round(np.nan_to_num(out[row]) * 255).astype(np.uint8)
        s = [float(v) for v in scores[:, row]]
        entry = {"source": rec["path"], "class_name": rec["class_name"], "class_index": rec["class_index"],
                 "output": output_relpath(rec), "prompt": prompt, "seed": int(config.seed),
                 "source_id": int(ids[j]), "scores": s, "losses": [float(v) for v in losses[:, row]],
                 "in_band": abs(s[-1] - config.target) <= config.band,
                 "stayed_in_distribution": s[-1] < config.target - config.band, "status": statuses[j]}
        _write_png(pixels, os.path.join(out_dir, entry["output"]))  # the PNG before its manifest line
        manifest.write(json.dumps(entry, sort_keys=True) + "\n")
      manifest.flush()  # on an object store: the manifest so far, once a batch
      progress.update(n_real, extra=", ".join(f"{k} {v}" for k, v in health.counts(statuses).items() if v))
      monitor.add(statuses)
      monitor.check(c=_global_counts(monitor.statuses))

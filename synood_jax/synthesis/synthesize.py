"""Near-boundary OOD synthesis (SynOOD stage 1): sources -> in-painting + boundary refinement -> images.

x_syn = D(z0 / scaling_factor),  z0 = Sampler(add_noise(E(x), eps_K, t0), "A photo only remain {context}.")

The driver and its threaded host loop; the per-batch programs are in `programs.py`, the output folder
(`<out>/<class>/<name>_ood.JPEG` (PIL quality 75, as the official script) or `_ood.png`,
`<out>/manifest.jsonl`, resume) in `manifest.py`, `<out>/procedure.json` in `procedure.py`.
The settings are built once from config.synthesis (`Settings`): a field the config leaves out takes the
paper's value (`config.base_config()`), never another.
Each image's noise comes from (seed, source id), never from its place in a batch, so the device count
and batch composition do not change the result. Several processes share the work (`synthesize`); a run
killed with one process count resumes with another.
Each record has a health `status` (`health.py`: ok, nonfinite, degenerate, in_distribution) and the
classifier's class count C (s <= -log C); the run stops with the counts and the likely cause once too
many images failed (nonfinite, degenerate; in_distribution is an outcome, never a stop). A target m
above -log C is warned about before the first batch. An unreadable source is
skipped with a warning naming it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import zlib
from concurrent import futures
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from PIL import Image

from synood_jax import config as config_lib, decode, fileio, parallel, runtime
from synood_jax.diffusion import inpaint
from synood_jax.progress import Progress
from synood_jax.synthesis import guidance, health, manifest, procedure, programs, refinement
from synood_jax.synthesis.sources import SourceRecord


# ---------------------------------------------------------------------------------------------
# The settings.

# Fields naming how the caller built the pipeline and the classifier (synthesize takes those built):
# recorded in procedure.json as the config states them, None when it does not.
_STATED_ONLY = ("scheduler", "classifier", "clip_logit_scale", "resnet_path")


@dataclasses.dataclass(frozen=True)
class Settings:
  """config.synthesis as synthesis reads it, built once (`from_config`)."""
  seed: int
  image_size: int
  steps: int
  strength: float
  guidance_scale: float
  iterations: int                # K
  step_size: float               # r
  target: float                  # m
  loss: str
  grad_mode: str
  reference_batch: float
  band: float
  max_not_ok: float
  min_pixel_std: float
  batch_size: int                # global
  decode_chunk: int
  image_format: str
  jpeg_quality: int
  log_every_secs: float
  scheduler: str | None = None
  classifier: str | None = None
  clip_logit_scale: float | None = None
  resnet_path: str | None = None

  def __post_init__(self):
    if self.image_format not in manifest.IMAGE_FORMATS:
      raise ValueError(f"config.synthesis.image_format: {self.image_format!r} is not one of "
                       f"{sorted(manifest.IMAGE_FORMATS)}")
    refinement.RefineConfig(self.iterations, self.loss, self.grad_mode, self.decode_chunk)  # checks them now

  @classmethod
  def from_config(cls, config) -> "Settings":
    """From config.synthesis (a ConfigDict or a dict); a field it leaves out takes the paper's value
    (`config.base_config().synthesis`: one source of defaults), never a fallback of its own."""
    if isinstance(config, cls):
      return config
    paper = config_lib.base_config().synthesis
    kw = {f.name: config[f.name] if f.name in config else paper.get(f.name) for f in dataclasses.fields(cls)}
    kw.update({k: config[k] if k in config else None for k in _STATED_ONLY})
    kw["decode_chunk"] = int(kw["decode_chunk"] or 0)
    return cls(**kw)

  @property
  def refine(self) -> refinement.RefineConfig:
    """What shapes the programs (new values compile new ones)."""
    return refinement.RefineConfig(iterations=self.iterations, loss=self.loss, grad_mode=self.grad_mode,
                                   decode_chunk=self.decode_chunk)

  @property
  def hyper(self) -> refinement.Hyper:
    """The refinement scalars the programs take traced (r, m, reference batch)."""
    return refinement.Hyper.make(self.step_size, self.target, self.reference_batch)


# ---------------------------------------------------------------------------------------------
# Sources.

def source_id(relpath: str) -> int:
  """A stable 31-bit id of a source, from its path relative to the source root."""
  return zlib.crc32(relpath.replace(os.sep, "/").encode()) & 0x7FFFFFFF


def load_source_image(path: str, size: int) -> np.ndarray:
  """RGB (`synood_jax/decode.py`, as every stage converts) resized to size x size (aspect not kept, as the
  official code), float32 in [-1, 1]."""
  with Image.open(path) as im:
    im = decode.to_rgb(im).resize((size, size), Image.BICUBIC)
    return np.asarray(im, np.float32) / 127.5 - 1.0


def _load_images(chunk: Sequence[tuple[dict, str]], root: str, size: int):
  """(images, the rows of `chunk` that could be read); an unreadable source is skipped with a warning
  naming it (the stage counts the sources missing from the manifest)."""
  images, kept = [], []
  for rec, prompt in chunk:
    path = os.path.join(root, rec.path)
    try:
      images.append(load_source_image(path, size))
      kept.append((rec, prompt))
    except Exception as e:  # noqa: BLE001  PIL raises OSError, UnidentifiedImageError, SyntaxError...
      logging.warning("synthesis: skipping unreadable source %s (%s: %s)", path, type(e).__name__, e)
  return images, kept


# ---------------------------------------------------------------------------------------------
# The host loop.

def _global_counts(statuses) -> dict[str, int]:
  """Status counts over every process (each process judges the same numbers, so all stop together)."""
  c = health.counts(statuses)
  if jax.process_count() > 1:
    total = np.sum(multihost_utils.process_allgather(np.array([c[s] for s in health.STATUSES])), axis=0)
    c = {s: int(v) for s, v in zip(health.STATUSES, total)}
  return c


def _run_batches(settings: Settings, out_dir, own_manifest, pipe, params, logits_fn, num_classes, source_root,
                 mesh, todo, filler, n_batches, progress, monitor):
  """Synthesize this process's `todo` sources in n_batches batches (its `local_batch` rows of each global
  batch), writing each image, then its line in this process's manifest. `filler` stands in (a blank image)
  for a process with fewer (or no readable) sources left, so that it takes part in every collective step.
  The host overlaps the device: while batch b runs, one thread reads batch b + 1,
  the main thread judges batch b - 1 (health, collectively across processes) and another thread
  writes it."""
  config = settings
  local_batch = config.batch_size // jax.process_count()
  # Params stay as the caller placed them (by config.mesh.sharding_rules): the programs take them so.
  params = parallel.place_params(params, mesh)
  negative_ids = jnp.asarray(pipe.tokenize([""]))
  masked = programs.masked_image_latents(pipe, params["vae"], config.image_size)
  step_fn = programs.BatchProgram(pipe, config.refine, config.steps, logits_fn, mesh, parallel.shardings_of(params))
  consts = (negative_ids, masked, np.int32(inpaint.start_index(pipe.scheduler, config.steps, config.strength)),
            np.float32(config.guidance_scale), config.hyper, np.uint32(config.seed))
  offset = jax.process_index() * local_batch if jax.process_count() > 1 else 0

  def load(b):
    """Host side of batch b: its readable (record, prompt) rows and padded source images, ids, prompt ids."""
    images, chunk = _load_images(todo[b * local_batch:(b + 1) * local_batch], source_root, config.image_size)
    n_real = len(chunk)
    if n_real == 0:  # an idle process (or a batch of unreadable files) takes part with a dummy row
      chunk, images = [filler], [np.zeros((config.image_size, config.image_size, 3), np.float32)]
    ids = np.array([source_id(r.path) for r, _ in chunk], np.int32)
    prompt_ids = np.asarray(pipe.tokenize([p for _, p in chunk]))
    arrays = tuple(parallel.pad_batch(x, local_batch)[0] for x in (np.stack(images), ids, prompt_ids))
    return chunk[:n_real], arrays

  shown = health.counts([])  # written by the one writer thread only

  def write(rows, ids, out, scores, losses, statuses, lines, counted):
    """Each image file, then its manifest line (the order resuming relies on); `counted`: the rows are
    already in the progress count."""
    for j, (rec, prompt) in enumerate(rows):
      pixels = np.round(np.nan_to_num(out[offset + j]) * 255).astype(np.uint8)
      s = [float(v) for v in scores[:, offset + j]]
      entry = {"source": rec.path, "class_name": rec.class_name, "class_index": rec.class_index,
               "output": manifest.output_relpath(rec, config.image_format), "prompt": prompt, "seed": int(config.seed),
               "source_id": int(ids[j]), "scores": s, "losses": [float(v) for v in losses[:, offset + j]],
               "num_classes": num_classes, "status": statuses[j],
               "stayed_in_distribution": statuses[j] == "in_distribution"}
      manifest.write_image(pixels, os.path.join(out_dir, entry["output"]), config.image_format, config.jpeg_quality)
      lines.write(json.dumps(entry, sort_keys=True) + "\n")
    lines.flush()  # on an object store: the manifest so far, once a batch
    for k in statuses:  # the statuses of this run so far (as the report counts them), not the batch's
      shown[k] += 1
    progress.update(0 if counted else len(rows), extra=", ".join(f"{k} {v}" for k, v in shown.items() if v))

  with fileio.LineLog(own_manifest, per_process=jax.process_count() > 1) as lines, \
       futures.ThreadPoolExecutor(1, "synthesis-load") as loader, \
       futures.ThreadPoolExecutor(1, "synthesis-write") as writer:
    written, started = None, time.perf_counter()

    def finish(rows, ids, outputs, first):
      nonlocal written
      out, scores, losses, _, steps_finite = parallel.to_host(outputs)
      if first:  # items/s and the ETA count from here, not from before the tracing and compiles
        logging.info("synthesis: the first batch, tracing and compiling its programs included, took %.1f s",
                     time.perf_counter() - started)
        progress.restart(done=len(rows))
      mine_rows = slice(offset, offset + len(rows))
      statuses = health.classify_batch(out[mine_rows], scores[:, mine_rows], steps_finite[mine_rows],
                                       target=config.target, band=config.band, num_classes=num_classes,
                                       loss=config.loss, min_pixel_std=config.min_pixel_std)
      if written is not None:
        written.result()  # surfaces a failed write; keeps at most one batch being written
      written = writer.submit(write, rows, ids, out, scores, losses, statuses, lines, first)
      monitor.add(statuses)
      monitor.check(c=_global_counts(monitor.statuses))

    next_batch, pending = loader.submit(load, 0), None
    for b in range(n_batches):
      rows, (images, ids, prompt_ids) = next_batch.result()
      if b + 1 < n_batches:
        next_batch = loader.submit(load, b + 1)
      args = (params, *parallel.global_batch((images, ids, prompt_ids), mesh), *consts)
      # Dispatched: the device runs it while the host finishes the batch before. The first call traces
      # and compiles each program as it reaches it (not ahead), so the device already runs one piece
      # while the host traces the next: 2 s less before the first images on CPU (README).
      outputs = step_fn(*args)
      if pending is not None:
        finish(*pending, first=b == 1)
      pending = (rows, ids, outputs)
    finish(*pending, first=n_batches == 1)
    written.result()


def synthesize(config, out_dir: str, pipe, params: dict, logits_fn: Callable, source_root: str,
               sources: Sequence[SourceRecord], prompts: Sequence[str], mesh) -> list[dict]:
  """Synthesize one image per source (with prompt) into out_dir; returns every source's manifest record
  (all processes', in source order).

  config: config.synthesis (or `Settings`); a field it leaves out takes the paper's value.
  params: {'unet', 'vae', 'text', 'classifier'}, placed on `mesh` as the caller chose (e.g. by
  config.mesh.sharding_rules; unplaced leaves are replicated); the programs take them as they lie.

  Every process runs this with the same sources. Process 0 first checks that out_dir holds images of
  this procedure and folds what earlier (maybe killed) runs left into manifest.jsonl; then the sources
  not in it are dealt round-robin to the processes, each writes its own images and appends to its own
  manifest.<process>.jsonl, and process 0 merges them.
  """
  config = Settings.from_config(config)
  nproc, me = jax.process_count(), jax.process_index()
  order = [r.path for r in sources]
  manifest_path = manifest.manifest_path(out_dir)
  if fileio.is_writer():
    fileio.makedirs(out_dir)
    procedure.check_procedure(out_dir, procedure.procedure(config, pipe), manifest_path)
    manifest.consolidate(out_dir, order, check_outputs=True)
  runtime.barrier(f"synthesis {out_dir}: resume state merged")
  done = manifest.read_records(manifest_path)
  todo = [(r, p) for r, p in zip(sources, prompts) if r.path not in done]
  mine = todo[me::nproc]
  logging.info("synthesis: %d sources, %d done, %d to go (%d for process %d)", len(sources), len(done),
               len(todo), len(mine), me)

  local_batch = config.batch_size // nproc
  multiple = parallel.batch_size_multiple(mesh) // nproc
  if config.batch_size % nproc or local_batch % max(multiple, 1):
    raise ValueError(f"synthesis.batch_size {config.batch_size} is not a multiple of the "
                     f"{parallel.batch_size_multiple(mesh)} devices")
  num_classes = guidance.num_classes(logits_fn, params["classifier"], config.image_size)
  warning = health.target_warning(config.target, num_classes, config.loss)
  if warning:
    logging.warning("%s", warning)
  # Statuses so far: the finished images counted once (on process 0), each new one by its process.
  monitor = health.Monitor(config, len(sources), manifest_path,
                           [health.status_of(r) for r in done.values()] if me == 0 else [])
  monitor.check(c=_global_counts(monitor.statuses))  # a resumed run that already failed stops at once
  # The same on every process (each has ceil or floor of len(todo) / nproc sources): every process
  # runs the same number of collective steps.
  n_batches = parallel.ceil_div(parallel.ceil_div(len(todo), nproc), local_batch)
  if n_batches:
    own_manifest = manifest_path if nproc == 1 else manifest.process_manifest(out_dir, me)
    progress = Progress(total=len(mine), name="synthesis", unit="img", every_secs=config.log_every_secs)
    _run_batches(config, out_dir, own_manifest, pipe, params, logits_fn, num_classes, source_root, mesh, mine,
                 todo[0], n_batches, progress, monitor)
  runtime.barrier(f"synthesis {out_dir}: every process finished")
  if fileio.is_writer():
    manifest.consolidate(out_dir, order)
  runtime.barrier(f"synthesis {out_dir}: manifest merged")
  monitor.check(final=True, c=_global_counts(monitor.statuses))  # also when a rerun had nothing to do
  merged = manifest.read_records(manifest_path)
  return [merged[s] for s in order if s in merged]

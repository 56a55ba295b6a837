"""Near-boundary OOD synthesis (SynOOD stage 1): sources -> in-painting + boundary refinement -> images.

x_syn = D(z0 / scaling_factor),  z0 = Sampler(add_noise(E(x), eps_K, t0), "A photo only remain {context}.")

Writes `<out>/<class>/<name>_ood.JPEG` (PIL quality 75, as the official script) or `_ood.png`,
`<out>/manifest.jsonl` and `<out>/procedure.json`. Resumable: an image is written atomically before its
manifest line, a rerun skips sources with both, and the finished manifest is rewritten in source order,
so a run killed at any moment and rerun equals an uninterrupted one. A folder written by another
procedure (another `PROCEDURE_VERSION` or other output-determining fields) is refused, never resumed.
Each image's noise comes from (seed, source id), never from its place in a batch, so the device count
and batch composition do not change the result. Several processes share the work (`synthesize`); a run
killed with one process count resumes with another, since the resume state is the union of every
manifest.
Each record has a health `status` (`health.py`: ok, nonfinite, degenerate, in_distribution) and the
classifier's class count C (s <= -log C); the run stops with the counts and the likely cause once too
many images failed (nonfinite, degenerate; in_distribution is an outcome, never a stop). A target m
above -log C is warned about before the first batch. An unreadable source is
skipped with a warning naming it.
"""
from __future__ import annotations

import functools
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
from PIL import Image

from jax.sharding import NamedSharding, PartitionSpec as P

from synood_jax import decode, fileio, parallel, runtime
from synood_jax.jsonl import read_jsonl
from synood_jax.synthesis import guidance, health, refinement
from synood_jax.diffusion import inpaint, schedulers
from synood_jax.models import vae as vae_lib
from synood_jax.progress import Progress


def source_id(relpath: str) -> int:
  """A stable 31-bit id of a source, from its path relative to the source root."""
  return zlib.crc32(relpath.replace(os.sep, "/").encode()) & 0x7FFFFFFF


# Output files: extension and PIL save arguments. The official script saves `{name}_ood.JPEG` with PIL's
# default JPEG settings (quality 75, 4:2:0 chroma subsampling).
IMAGE_FORMATS = {"jpeg": ".JPEG", "png": ".png"}


def output_relpath(record: dict, image_format: str = "png") -> str:
  stem = os.path.splitext(os.path.basename(record["path"]))[0]
  return os.path.join(record["class_name"], f"{stem}_ood{IMAGE_FORMATS[image_format]}")


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
    path = os.path.join(root, rec["path"])
    try:
      images.append(load_source_image(path, size))
      kept.append((rec, prompt))
    except Exception as e:  # noqa: BLE001  PIL raises OSError, UnidentifiedImageError, SyntaxError...
      logging.warning("synthesis: skipping unreadable source %s (%s: %s)", path, type(e).__name__, e)
  return images, kept


# ---------------------------------------------------------------------------------------------
# The per-batch programs.

def draw_inputs(pipe, vae_params, images: jax.Array, ids: jax.Array, seed: jax.Array):
  """(z_in, eps): each image's posterior sample of its source, scaled, and its noise, both from
  (seed, source id)."""
  key = jax.random.key(seed)
  keys = jax.vmap(lambda i: (jax.random.fold_in(jax.random.fold_in(key, 0), i),
                             jax.random.fold_in(jax.random.fold_in(key, 1), i)))
  k_src, k_eps = keys(ids)
  mean, logvar = pipe.vae_encode(vae_params, images)
  mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
  z_in = jax.vmap(vae_lib.vae_sample)(mean, logvar, k_src) * pipe.scaling_factor
  eps = jax.vmap(lambda k: jax.random.normal(k, z_in.shape[1:], jnp.float32))(k_eps)
  return z_in, eps


def text_context(pipe, text_params, prompt_ids: jax.Array, negative_ids: jax.Array):
  """(cond, uncond) text-encoder states [B, L, D]: each prompt's and the empty negative prompt's."""
  cond = pipe.text_hidden(text_params, prompt_ids)
  return cond, jnp.broadcast_to(pipe.text_hidden(text_params, negative_ids), cond.shape)


def refine_models(pipe, refine_cfg: refinement.RefineConfig, steps: int, logits_fn: Callable,
                  z_in: jax.Array, cond: jax.Array, uncond: jax.Array, masked_latents: jax.Array,
                  first_index: jax.Array, guidance_scale: jax.Array) -> refinement.Models:
  """The in-painting pipeline and classifier as `refinement.Models` for one batch (its source latents
  z_in and text states): add_noise at the strength cut t0, the sampler from there (full-image mask,
  the all-zero image's latents), u = z0 / scaling_factor, the VAE decoder, the classifier."""
  mask = jnp.ones(z_in.shape[:-1] + (1,), jnp.float32)
  masked = jnp.broadcast_to(masked_latents, z_in.shape)
  t0 = jnp.asarray(inpaint.timestep_table(pipe.scheduler, steps))[first_index]
  vae_cfg = pipe.vae.cfg
  return refinement.Models(
      noise=lambda e: schedulers.add_noise(pipe.scheduler, z_in, e, jnp.full((e.shape[0],), t0)),
      sample=lambda p, z_t: inpaint.sample_latents(pipe.unet, pipe.scheduler, p["unet"], z_t, cond, uncond, mask,
                                                   masked, guidance_scale, steps, first_index, image_latents=z_in,
                                                   noise=z_t, remat=refine_cfg.grad_mode == "exact"),
      input=lambda z0: inpaint.decoder_input(z0, pipe.scaling_factor, vae_cfg.latents_mean, vae_cfg.latents_std),
      decode=lambda p, u: inpaint.decode_unscaled(pipe.vae_decode, p["vae"], u, refine_cfg.decode_chunk),
      logits=lambda p, x: logits_fn(p["classifier"], x))


def refine_batch(pipe, refine_cfg: refinement.RefineConfig, steps: int, logits_fn: Callable, params: dict,
                 z_in: jax.Array, eps: jax.Array, prompt_ids: jax.Array, negative_ids: jax.Array,
                 masked_latents: jax.Array, first_index: jax.Array, guidance_scale: jax.Array,
                 hyper: refinement.Hyper):
  """All K refinement iterations from given source latents z_in and noise eps, as one traceable function
  (`refinement.refine`)."""
  cond, uncond = text_context(pipe, params["text"], prompt_ids, negative_ids)
  models = refine_models(pipe, refine_cfg, steps, logits_fn, z_in, cond, uncond,
                         masked_latents, first_index, guidance_scale)
  return refinement.refine(refine_cfg, hyper, models, params, eps)


def synthesize_batch(pipe, refine_cfg: refinement.RefineConfig, steps: int, logits_fn: Callable, params: dict,
                     images: jax.Array, ids: jax.Array, prompt_ids: jax.Array, negative_ids: jax.Array, masked_latents: jax.Array,
                     first_index: jax.Array, guidance_scale: jax.Array, hyper: refinement.Hyper,
                     seed: jax.Array):
  """All K refinement iterations for one batch as one traceable function; `BatchProgram` runs the same
  computation as separate programs. params: {'unet','vae','text','classifier'}.

  `steps` (the scheduler table length) and `refine_cfg` are static; the strength cut `first_index`,
  the guidance scale and the refinement scalars `hyper` (r, m, reference batch) are traced. Each
  image's posterior sample and noise come from (seed, its source id).
  """
  z_in, eps = draw_inputs(pipe, params["vae"], images, ids, seed)
  return refine_batch(pipe, refine_cfg, steps, logits_fn, params, z_in, eps, prompt_ids,
                      negative_ids, masked_latents, first_index, guidance_scale, hyper)


class BatchProgram:
  """`synthesize_batch` as four jitted programs on a host loop: start (source latents, noise, text
  states), sample (K times), update (K - 1 times) and outcome (decode, classify, stack the scores).

  Why not one program: the unrolled K-loop repeats the sampler and the gradient in one executable, which
  took 11-12 s to trace, lower and load from the compile cache before the first batch on CPU (small
  preset); the pieces compile each computation once, and run as fast (README, "Synthesis speed").
  Dispatch is asynchronous, so the host loop does not wait for the device between pieces, and on a
  first call each piece is traced and compiled while the device runs the one before.

  Each program has explicit shardings: params as `param_shardings`, batch rows split over every device,
  scalars replicated, scores and losses [K, B] split on B; eps is donated to the update that replaces it.
  Call it with `synthesize_batch`'s arguments (after params); it returns (images, scores [K, B],
  losses [K, B], eps, steps_finite [B]). `compile` compiles every piece ahead instead.
  """

  def __init__(self, pipe, refine_cfg: refinement.RefineConfig, steps: int, logits_fn: Callable, mesh,
               param_shardings):
    self.cfg, self.mesh = refine_cfg, mesh
    rep = parallel.replicated(mesh)
    rows = lambda ndim: parallel.batch_sharding(mesh, ndim)
    batch = (rows(4), rows(3), rows(3))   # z_in, cond, uncond
    consts = (rep, rep, rep)              # masked latents, first index, guidance scale
    step = (rows(1), rows(1), rows(1))    # ok, loss, s of one update

    def models(b, c):
      return refine_models(pipe, refine_cfg, steps, logits_fn, *b, *c)

    def start(params, images, ids, prompt_ids, negative_ids, seed):
      z_in, eps = draw_inputs(pipe, params["vae"], images, ids, seed)
      return (z_in, *text_context(pipe, params["text"], prompt_ids, negative_ids)), eps

    def sample(params, b, c, eps):
      return refinement.sample(models(b, c), params, eps)

    def update(params, b, c, hyper, eps, z0):
      return refinement.update(refine_cfg, hyper, models(b, c), params, eps, z0)

    def outcome(params, b, c, hyper, z0, history):
      return refinement.outcome(refine_cfg, hyper, models(b, c), params, z0, history)

    self.start = jax.jit(start, in_shardings=(param_shardings, rows(4), rows(1), rows(2), rep, rep),
                         out_shardings=(batch, rows(4)))
    self.sample = jax.jit(sample, in_shardings=(param_shardings, batch, consts, rows(4)), out_shardings=rows(4))
    z0_sharding = rows(4) if refine_cfg.grad_mode == "skip" else None
    self.update = jax.jit(update, in_shardings=(param_shardings, batch, consts, rep, rows(4), z0_sharding),
                          out_shardings=(rows(4), *step), donate_argnums=(4,))
    per_iteration = NamedSharding(mesh, P(None, parallel.BATCH_AXES))
    self.outcome = jax.jit(outcome, in_shardings=(param_shardings, batch, consts, rep, rows(4),
                                                  (step,) * (refine_cfg.iterations - 1)),
                           out_shardings=(rows(4), per_iteration, per_iteration, rows(1)))

  def __call__(self, params, images, ids, prompt_ids, negative_ids, masked_latents, first_index,
               guidance_scale, hyper, seed):
    with jax.set_mesh(self.mesh):  # traced under the mesh: fused attention kernels run per device
      b, eps = self.start(params, images, ids, prompt_ids, negative_ids, seed)
      c = (masked_latents, first_index, guidance_scale)
      return refinement.run(self.cfg, lambda e: self.sample(params, b, c, e),
                            lambda e, z0: self.update(params, b, c, hyper, e, z0),
                            lambda z0, history: self.outcome(params, b, c, hyper, z0, history), eps)

  def compile(self, params, images, ids, prompt_ids, negative_ids, masked_latents, first_index,
              guidance_scale, hyper, seed, only: Sequence[str] | None = None) -> "BatchProgram":
    """Compile every program (or those named in `only`) ahead for these arguments' shapes, which may be
    abstract (jax.ShapeDtypeStruct): the lowering on this thread, XLA's compiles or cache loads on one
    thread each, in parallel. Returns self, now holding the executables, with the seconds each part took
    in `compile_seconds` ({'lower_s', 'xla_s'})."""
    t0 = time.perf_counter()
    with jax.set_mesh(self.mesh):
      start_args = (params, images, ids, prompt_ids, negative_ids, seed)
      b, eps = jax.eval_shape(self.start, *start_args)
      c = (masked_latents, first_index, guidance_scale)
      update_args = (params, b, c, hyper, eps, eps if self.cfg.grad_mode == "skip" else None)  # z0 is eps-shaped
      step = jax.eval_shape(self.update, *update_args)[1:]
      lowered = {"start": self.start.lower(*start_args),
                 "sample": self.sample.lower(params, b, c, eps),
                 "outcome": self.outcome.lower(params, b, c, hyper, eps, (step,) * (self.cfg.iterations - 1))}
      if self.cfg.iterations > 1:
        lowered["update"] = self.update.lower(*update_args)
      lowered = {name: low for name, low in lowered.items() if only is None or name in only}
    t1 = time.perf_counter()
    with futures.ThreadPoolExecutor(len(lowered), "synthesis-compile") as pool:
      done = {name: pool.submit(low.compile) for name, low in lowered.items()}
      for name, fut in done.items():
        setattr(self, name, fut.result())
    self.compile_seconds = {"lower_s": t1 - t0, "xla_s": time.perf_counter() - t1}
    return self


def place_params(params, mesh):
  """(params placed by `parallel.param_shardings`, those shardings). Leaves already placed so (the
  pipeline's, sharded once at load) are kept as they are: no second copy."""
  shardings = parallel.param_shardings(params, mesh)

  def one(x, s):
    placed = isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim)
    return x if placed else jax.device_put(x, s)

  return jax.tree_util.tree_map(one, params, shardings), shardings


def masked_image_latents(pipe, vae_params, size: int) -> jax.Array:
  """Latents of the all-zero masked image (the mask covers everything): the posterior mean, scaled.

  The official pipeline samples this posterior on every call; the mean is its deterministic choice.
  """
  return _masked_image_latents(pipe.vae, pipe.scaling_factor, size, vae_params)


# Jitted (op by op, the VAE encoder took seconds of a cold start); static on the VAE module and numbers
# only, so the jit cache holds no pipeline or params.
@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _masked_image_latents(vae_module, scaling_factor: float, size: int, vae_params):
  zeros = jnp.zeros((1, size, size, 3), jnp.float32)
  mean, _ = vae_module.apply({"params": vae_params}, zeros, method=vae_module.encode)
  return mean.astype(jnp.float32) * scaling_factor


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


# ---------------------------------------------------------------------------------------------
# The procedure an output folder was written with.

# Bump when the same config gives other images (the pipeline's stage fingerprint uses it too).
# 2: per-image health status. 3: the update is dL/du at the decoder's input (issue 15); before, dL/dz0,
# a 1/scaling_factor = 5.49x larger step.
PROCEDURE_VERSION = 3
# config.synthesis fields that change an image (batch size, decode chunk and logging do not).
OUTPUT_FIELDS = ("seed", "image_size", "steps", "strength", "guidance_scale", "scheduler", "iterations",
                 "step_size", "target", "loss", "grad_mode", "reference_batch", "classifier",
                 "clip_logit_scale", "resnet_path", "image_format", "jpeg_quality")


class StaleSynthesisError(ValueError):
  """An output folder holds images of another synthesis procedure; the message names what differs."""


def procedure(config, pipe) -> dict:
  """What determines this run's images: the procedure version, the output fields of config, the
  scheduler actually used and the networks' dtype."""
  fields = {k: config.get(k) for k in OUTPUT_FIELDS if k in config}
  fields.setdefault("image_format", "png")
  out = {"version": PROCEDURE_VERSION, "scheduler_kind": pipe.scheduler.kind,
         "dtype": jnp.dtype(pipe.unet.dtype).name, "config": fields}
  return json.loads(json.dumps(out, sort_keys=True))


def check_procedure(out_dir: str, expected: dict, manifest_path: str) -> None:
  """Record `expected` in out_dir/procedure.json, or refuse a folder written by another procedure."""
  path = os.path.join(out_dir, "procedure.json")
  if fileio.exists(path):
    found = json.loads(fileio.path(path).read_text())
    if found != expected:
      diff = [f"{k}: {found.get(k)!r} -> {expected.get(k)!r}" for k in sorted(set(found) | set(expected))
              if k != "config" and found.get(k) != expected.get(k)]
      fc, ec = found.get("config", {}), expected["config"]
      diff += [f"config.synthesis.{k}: {fc.get(k)!r} -> {ec.get(k)!r}" for k in sorted(set(fc) | set(ec))
               if fc.get(k) != ec.get(k)]
      raise StaleSynthesisError(
          f"{out_dir}: its images were synthesized by another procedure ({'; '.join(diff)}). "
          "Delete the folder (or use another workdir) to synthesize them again.")
    return
  if read_manifest(manifest_path):
    raise StaleSynthesisError(
        f"{out_dir}: {os.path.basename(manifest_path)} lists images but there is no procedure.json: they "
        "were written before procedure versions were recorded (refinement step 5.49x the official one). "
        "Delete the folder (or use another workdir) to synthesize them again.")
  fileio.atomic_write(path, json.dumps(expected, indent=1, sort_keys=True))


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


def _write_image(pixels: np.ndarray, path: str, image_format: str, jpeg_quality: int) -> None:
  """A synthetic image, atomically, by the process that made it (PIL JPEG at `jpeg_quality`, or PNG)."""
  options = {"format": "JPEG", "quality": int(jpeg_quality)} if image_format == "jpeg" else {"format": "PNG"}
  fileio.atomic_write(path, lambda f: Image.fromarray(pixels).save(f, **options), per_process=True)


def _global_counts(statuses) -> dict[str, int]:
  """Status counts over every process (each process judges the same numbers, so all stop together)."""
  c = health.counts(statuses)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    total = np.sum(multihost_utils.process_allgather(np.array([c[s] for s in health.STATUSES])), axis=0)
    c = {s: int(v) for s, v in zip(health.STATUSES, total)}
  return c


def _run_batches(config, out_dir, manifest_path, pipe, params, logits_fn, num_classes, source_root, mesh, todo,
                 filler, n_batches, progress, monitor):
  """Synthesize this process's `todo` sources in n_batches batches (its `local_batch` rows of each global
  batch), writing each image, then its line in this process's manifest. `filler` stands in (a blank image)
  for a process with fewer (or no readable) sources left, so that it takes part in every collective step. The host overlaps the device: while batch b runs, one thread reads batch b + 1,
  the main thread judges batch b - 1 (health, collectively across processes) and another thread
  writes it."""
  local_batch = config.batch_size // jax.process_count()
  image_format = config.get("image_format", "png")
  refine_cfg = refinement.RefineConfig(iterations=config.iterations, loss=config.loss, grad_mode=config.grad_mode,
                                       decode_chunk=int(config.get("decode_chunk") or 0))
  hyper = refinement.Hyper.make(config.step_size, config.target, config.get("reference_batch", 1))
  first_index = np.int32(inpaint.start_index(pipe.scheduler, config.steps, config.strength))
  params, shardings = place_params(params, mesh)
  negative_ids = jnp.asarray(pipe.tokenize([""]))
  masked = masked_image_latents(pipe, params["vae"], config.image_size)
  step_fn = BatchProgram(pipe, refine_cfg, config.steps, logits_fn, mesh, shardings)
  consts = (negative_ids, masked, first_index, np.float32(config.guidance_scale), hyper, np.uint32(config.seed))
  offset = jax.process_index() * local_batch if jax.process_count() > 1 else 0

  def load(b):
    """Host side of batch b: its readable (record, prompt) rows and padded source images, ids, prompt ids."""
    images, chunk = _load_images(todo[b * local_batch:(b + 1) * local_batch], source_root, config.image_size)
    n_real = len(chunk)
    if n_real == 0:  # an idle process (or a batch of unreadable files) takes part with a dummy row
      chunk, images = [filler], [np.zeros((config.image_size, config.image_size, 3), np.float32)]
    ids = np.array([source_id(r["path"]) for r, _ in chunk], np.int32)
    prompt_ids = np.asarray(pipe.tokenize([p for _, p in chunk]))
    arrays = tuple(parallel.pad_batch(x, local_batch)[0] for x in (np.stack(images), ids, prompt_ids))
    return chunk[:n_real], arrays

  shown = health.counts([])  # written by the one writer thread only

  def write(rows, ids, out, scores, losses, statuses, manifest, counted):
    """Each image file, then its manifest line (the order resuming relies on); `counted`: the rows are
    already in the progress count."""
    for j, (rec, prompt) in enumerate(rows):
      pixels = np.round(np.nan_to_num(out[offset + j]) * 255).astype(np.uint8)
      s = [float(v) for v in scores[:, offset + j]]
      entry = {"source": rec["path"], "class_name": rec["class_name"], "class_index": rec["class_index"],
               "output": output_relpath(rec, image_format), "prompt": prompt, "seed": int(config.seed),
               "source_id": int(ids[j]), "scores": s, "losses": [float(v) for v in losses[:, offset + j]],
               "num_classes": num_classes, "status": statuses[j],
               "stayed_in_distribution": statuses[j] == "in_distribution"}
      _write_image(pixels, os.path.join(out_dir, entry["output"]), image_format, config.get("jpeg_quality", 75))
      manifest.write(json.dumps(entry, sort_keys=True) + "\n")
    manifest.flush()  # on an object store: the manifest so far, once a batch
    for k in statuses:  # the statuses of this run so far (as the report counts them), not the batch's
      shown[k] += 1
    progress.update(0 if counted else len(rows), extra=", ".join(f"{k} {v}" for k, v in shown.items() if v))

  with fileio.LineLog(manifest_path, per_process=jax.process_count() > 1) as manifest, \
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
                                       loss=config.loss, min_pixel_std=config.get("min_pixel_std", 0.01))
      if written is not None:
        written.result()  # surfaces a failed write; keeps at most one batch being written
      written = writer.submit(write, rows, ids, out, scores, losses, statuses, manifest, first)
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
               sources: Sequence[dict], prompts: Sequence[str], mesh) -> list[dict]:
  """Synthesize one image per source (with prompt) into out_dir; returns every source's manifest record
  (all processes', in source order).

  config: image_size, steps, strength, guidance_scale, seed, batch_size (global), band, the
  refinement fields iterations, step_size, target, loss, grad_mode, reference_batch, and the output
  format image_format ('jpeg' or 'png'; default 'png') and jpeg_quality.

  Every process runs this with the same sources. Process 0 first checks that out_dir holds images of
  this procedure and folds what earlier (maybe killed) runs left into manifest.jsonl; then the sources
  not in it are dealt round-robin to the processes, each writes its own images and appends to its own
  manifest.<process>.jsonl, and process 0 merges them.
  """
  nproc, me = jax.process_count(), jax.process_index()
  image_format = config.get("image_format", "png")
  if image_format not in IMAGE_FORMATS:
    raise ValueError(f"config.synthesis.image_format: {image_format!r} is not one of {sorted(IMAGE_FORMATS)}")
  order = [r["path"] for r in sources]
  manifest_path = os.path.join(out_dir, "manifest.jsonl")
  if fileio.is_writer():
    fileio.makedirs(out_dir)
    check_procedure(out_dir, procedure(config, pipe), manifest_path)
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
  n_batches = -(-(-(-len(todo) // nproc)) // local_batch)
  if n_batches:
    own_manifest = manifest_path if nproc == 1 else process_manifest(out_dir, me)
    progress = Progress(total=len(mine), name="synthesis", unit="img", every_secs=config.get("log_every_secs", 30))
    _run_batches(config, out_dir, own_manifest, pipe, params, logits_fn, num_classes, source_root, mesh, mine,
                 todo[0], n_batches, progress, monitor)
  runtime.barrier(f"synthesis {out_dir}: every process finished")
  if fileio.is_writer():
    consolidate(out_dir, order)
  runtime.barrier(f"synthesis {out_dir}: manifest merged")
  monitor.check(final=True, c=_global_counts(monitor.statuses))  # also when a rerun had nothing to do
  merged = read_manifest(manifest_path)
  return [merged[s] for s in order if s in merged]

"""The training loop stages 2 and 3 share: torch-semantics schedules, resumable data order, checkpoints.

- Step s of the run is (epoch, position) = divmod(s, steps_per_epoch); epoch e visits the examples in
  the order `np.random.default_rng([seed, e]).permutation(n)`. A resumed run therefore sees exactly the
  batches the killed one would have seen.
- No example is dropped: the last batch of an epoch is padded (repeating a real row) to `batch_size` and
  carries a 0/1 mask; the loss is sum(mask * ce) / sum(mask), so padding rows add nothing and the
  gradient equals PyTorch's on the short last batch (DataLoader drop_last=False). One compiled shape.
- State: a flax TrainState, replicated (parallel.param_shardings with a replicate rule), born sharded
  via jit out_shardings; the step is jitted with explicit in/out shardings, donating the state. Batches
  are sharded over every device (parallel.global_batch); each host loads its own rows of the global batch.
- Checkpoints: orbax CheckpointManager in `{folder}/checkpoints`, every
  `checkpoint_every` steps and at every epoch end. `{folder}/run.json` records the data shape,
  batch, epochs, seed and optimiser settings; resuming with different ones raises. Metrics per step go
  to `{folder}/metrics.jsonl` as {step (updates done, 1-based), epoch (0-based), lr, loss, accuracy,
  grad_norm} (rows past the restored step are dropped on resume, so the file has each step once) and to
  TensorBoard when `config.tensorboard` is set (it needs tensorboardX, the `tensorboard` extra). Progress (steps/s, ETA)
  is logged through absl every `progress_every_secs`.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax.training import train_state

from synood_jax import fileio, parallel
from synood_jax.jsonl import read_jsonl
from synood_jax.progress import Progress

REPLICATE_ALL = ((".*", "replicate"),)



# ---------------------------------------------------------------------------------------------
# Losses and inputs

def masked_ce(logits, labels, mask):
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  mask = mask.astype(logits.dtype)
  denom = jnp.maximum(mask.sum(), 1.0)
  loss = (ce * mask).sum() / denom
  acc = ((jnp.argmax(logits, -1) == labels).astype(logits.dtype) * mask).sum() / denom
  return loss, {"accuracy": acc}


def as_features(name: str, x, ndim: int = 2) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != ndim:
    raise ValueError(f"{name}: expected a {ndim}-d array, got shape {x.shape}")
  return x.astype(np.float32, copy=False)


def host_normalize(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)




# ---------------------------------------------------------------------------------------------
# Schedules (torch semantics)

def epoch_cosine_schedule(lr: float, eta_min: float, epochs: int, steps_per_epoch: int):
  """torch CosineAnnealingLR(T_max=epochs, eta_min) stepped once per epoch, as a per-update schedule."""
  def schedule(count):
    epoch = count // steps_per_epoch
    return eta_min + (lr - eta_min) * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))
  return schedule


def epoch_lr(config, epoch: int) -> float:
  return config.eta_min + (config.lr - config.eta_min) * 0.5 * (1 + math.cos(math.pi * epoch / config.epochs))




# ---------------------------------------------------------------------------------------------
# Data order: step -> (epoch, position) -> rows

def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  return parallel.ceil_div(num_examples, batch_size)


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  return np.random.default_rng([int(seed), int(epoch)]).permutation(num_examples)


def batch_indices(step: int, *, num_examples: int, batch_size: int, seed: int,
                  _cache: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Global rows and 0/1 mask of run step `step` (0-based); the last batch of an epoch is padded."""
  spe = steps_per_epoch(num_examples, batch_size)
  epoch, pos = divmod(step, spe)
  if _cache is not None and _cache.get("epoch") == epoch:
    perm = _cache["perm"]
  else:
    perm = epoch_permutation(seed, epoch, num_examples)
    if _cache is not None:
      _cache.update(epoch=epoch, perm=perm)
  idx = perm[pos * batch_size:(pos + 1) * batch_size]
  mask = np.zeros((batch_size,), np.float32)
  mask[:len(idx)] = 1.0
  if len(idx) < batch_size:
    idx = np.concatenate([idx, np.full((batch_size - len(idx),), idx[-1], idx.dtype)])
  return idx, mask




# ---------------------------------------------------------------------------------------------
# The loop

class _MetricWriter:
  """metrics.jsonl (+ TensorBoard if available) on process 0; drops rows past a restored step."""

  def __init__(self, folder: str, start_step: int, tensorboard: bool):
    self.path = os.path.join(folder, "metrics.jsonl")
    self.enabled = fileio.is_writer()
    self._tb = None
    if not self.enabled:
      return
    if fileio.exists(self.path):
      kept = [row for row in read_jsonl(self.path, required=("step",)) if row["step"] <= start_step]
      fileio.atomic_write(self.path, "".join(json.dumps(row) + "\n" for row in kept))
    self._f = fileio.LineLog(self.path)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # optional: pip install "synood-jax[tensorboard]"
      except ImportError:
        raise ImportError("config.tensorboard=True needs tensorboardX: pip install 'synood-jax[tensorboard]' "
                          "or set --config.stage2.tensorboard=False / stage3") from None
      self._tb = SummaryWriter(os.path.join(folder, "tensorboard"))

  def write(self, row: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    self._f.write(json.dumps(row) + "\n")  # a killed job loses no written row
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, row["step"])

  def sync(self) -> None:
    """Rows on disk before a checkpoint names their step (survives a host crash, not only kill -9)."""
    if self.enabled:
      self._f.flush(durable=True)
      if self._tb is not None:
        self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._f.close()
      if self._tb is not None:
        self._tb.close()


def _check_run_file(folder: str, run: Mapping[str, Any]) -> None:
  path = os.path.join(folder, "run.json")
  if fileio.exists(path):
    old = fileio.read_json(path)
    diff = {k: (old.get(k), v) for k, v in run.items() if old.get(k) != v}
    if diff:
      raise ValueError(f"{path}: this workdir holds a run with other settings (old, new): {diff}; "
                       "use a fresh workdir or the same data and config")
  elif fileio.is_writer():
    fileio.write_json(path, dict(run), indent=2, sort_keys=True)


def train(config, *, name: str, params, tx, loss_fn: Callable, features: np.ndarray, labels: np.ndarray,
           consts, folder: str, mesh, run_info: Mapping[str, Any],
           on_epoch_end: Callable[[int, Any], None] | None = None,
           on_step: Callable[[int, Mapping[str, float]], None] | None = None):
  """Runs (or resumes) `config.epochs` epochs; returns the final TrainState (replicated)."""
  n = features.shape[0]
  bs = int(config.batch_size)
  multiple = parallel.batch_size_multiple(mesh)
  if bs % multiple or bs % jax.process_count():
    raise ValueError(f"config.batch_size={bs} must be a multiple of the {multiple} devices of the mesh")
  if labels.shape != (n,):
    raise ValueError(f"labels: shape {labels.shape}, expected ({n},) to match features {features.shape}")
  spe = steps_per_epoch(n, bs)
  total = spe * int(config.epochs)
  if fileio.is_writer():
    fileio.makedirs(folder)
  _check_run_file(folder, dict(run_info, num_examples=n, batch_size=bs, epochs=int(config.epochs),
                               seed=int(config.seed), lr=float(config.lr), eta_min=float(config.eta_min),
                               weight_decay=float(config.weight_decay),
                               logit_scale=float(config.logit_scale)))

  # State born replicated.
  param_sh = parallel.param_shardings(params, mesh, REPLICATE_ALL)
  params = jax.device_put(params, param_sh)

  def create(p):
    return train_state.TrainState.create(apply_fn=None, params=p, tx=tx)
  state_sh = parallel.param_shardings(jax.eval_shape(create, params), mesh, REPLICATE_ALL)
  state = jax.jit(create, in_shardings=(param_sh,), out_shardings=state_sh)(params)
  consts_sh = parallel.param_shardings(consts, mesh, REPLICATE_ALL)
  consts = jax.device_put(consts, consts_sh)
  batch_sh = {"x": parallel.batch_sharding(mesh, 2), "y": parallel.batch_sharding(mesh, 1),
              "mask": parallel.batch_sharding(mesh, 1)}
  rep = parallel.replicated(mesh)

  def step_fn(state, consts, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, consts, batch)
    state = state.apply_gradients(grads=grads)
    return state, dict(aux, loss=loss, grad_norm=optax.tree.norm(grads))

  train_step = jax.jit(step_fn, in_shardings=(state_sh, consts_sh, batch_sh),
                       out_shardings=(state_sh, rep), donate_argnums=(0,))

  manager = ocp.CheckpointManager(
      fileio.absolute(os.path.join(folder, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=int(config.max_to_keep), create=True,
                                           cleanup_tmp_directories=True,  # a save cut by a kill
                                           enable_async_checkpointing=False))
  start = manager.latest_step() or 0
  if start:
    state = manager.restore(start, args=ocp.args.StandardRestore(state))
    logging.info("%s: resumed from step %d/%d (%s)", name, start, total, manager.directory)
  if int(state.step) != start:
    raise ValueError(f"{manager.directory}: checkpoint {start} holds state.step={int(state.step)}")

  writer = _MetricWriter(folder, start, bool(config.tensorboard))
  progress = Progress(total, initial=start, name=name, unit="steps", every_secs=config.progress_every_secs)
  local_rows = bs // jax.process_count()
  lo = jax.process_index() * local_rows
  cache: dict = {}
  pending = None
  every = int(config.checkpoint_every)

  def flush(pending):
    step, epoch, lr, metrics = pending
    row = {"step": step, "epoch": epoch, "lr": lr, **{k: float(v) for k, v in metrics.items()}}
    writer.write(row)
    if on_step is not None:
      on_step(step, row)
    progress.update(1, extra=f"loss {row['loss']:.4f}")

  try:
    for step in range(start, total):
      idx, mask = batch_indices(step, num_examples=n, batch_size=bs, seed=config.seed, _cache=cache)
      idx, mask = idx[lo:lo + local_rows], mask[lo:lo + local_rows]
      batch = parallel.global_batch(
          {"x": features[idx], "y": labels[idx].astype(np.int32), "mask": mask}, mesh)
      state, metrics = train_step(state, consts, batch)
      if step == start:  # the first step compiled: steps/s and the ETA count from its end
        jax.block_until_ready(metrics)
        progress.restart()
      if pending is not None:  # write the previous step's metrics while this one runs
        flush(pending)
        pending = None
      done = step + 1
      epoch = step // spe
      pending = (done, epoch, epoch_lr(config, epoch), metrics)
      epoch_end = done % spe == 0
      if epoch_end or (every > 0 and done % every == 0) or done == total:
        flush(pending)
        pending = None
        if epoch_end and on_epoch_end is not None:
          on_epoch_end(done // spe, state)
        writer.sync()
        manager.save(done, args=ocp.args.StandardSave(state), force=True)
        manager.wait_until_finished()
    if pending is not None:
      flush(pending)
  finally:
    writer.close()
    manager.close()
  return state



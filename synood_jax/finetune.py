"""SynOOD stages 2 and 3 trained on cached (frozen) CLIP features.

Stage 2 (image side): f' = normalize(f + ReLU(LayerNorm(Linear(f)))), CE over 100 f'.T^T, T = [ID; negatives].
Stage 3 (text side): CE over 100 cos(f, E), E = the mined negatives' text features, trained.

What the official scripts do (`ind_ood_projection.py`, `ood_label_finetuning.py`) and what is matched here:
- Stage 2 feeds the *raw* CLIP image embedding (`encode_image`, not normalised) into the residual
  projection; `normalize_inputs=False` keeps that. Text features are L2-normalised (done here again;
  idempotent). Adam(lr 1e-3, weight_decay 1e-5: L2 added to the gradient, torch semantics),
  CosineAnnealingLR(T_max=epochs, eta_min=1e-5) stepped once per epoch, 3 epochs, batch 128.
- Stage 3 normalises both sides inside the logits; SGD(lr 2e-2, momentum 0.9, dampening 0,
  weight_decay 1e-5), CosineAnnealingLR(T_max=epochs) (eta_min 0), 5 epochs, batch 128. The official
  code saves the features after every epoch and loads `epoch_0.pth`, i.e. after the FIRST epoch:
  `keep_epoch=1` here (1-based count of completed epochs; 0 or None keeps the final ones).

Training loop (shared by both stages):
- Step s of the run is (epoch, position) = divmod(s, steps_per_epoch); epoch e visits the examples in
  the order `np.random.default_rng([seed, e]).permutation(n)`. A resumed run therefore sees exactly the
  batches the killed one would have seen.
- No example is dropped: the last batch of an epoch is padded (repeating a real row) to `batch_size` and
  carries a 0/1 mask; the loss is sum(mask * ce) / sum(mask), so padding rows add nothing and the
  gradient equals PyTorch's on the short last batch (DataLoader drop_last=False). One compiled shape.
- State: a flax TrainState, replicated (parallel.param_shardings with a replicate rule), born sharded
  via jit out_shardings; the step is jitted with explicit in/out shardings, donating the state. Batches
  are sharded over every device (parallel.global_batch); each host loads its own rows of the global batch.
- Checkpoints: orbax CheckpointManager in `{workdir}/{config.subdir}/checkpoints`, every
  `checkpoint_every` steps and at every epoch end. `{workdir}/{subdir}/run.json` records the data shape,
  batch, epochs, seed and optimiser settings; resuming with different ones raises. Metrics per step go
  to `{subdir}/metrics.jsonl` as {step (updates done, 1-based), epoch (0-based), lr, loss, accuracy,
  grad_norm} (rows past the restored step are dropped on resume, so the file has each step once) and to
  TensorBoard when tensorboardX is installed and `config.tensorboard` is set. Progress (steps/s, ETA)
  is logged through absl every `progress_every_secs`.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax.training import train_state

from synood_jax import parallel
from synood_jax.progress import Progress

REPLICATE_ALL = ((".*", "replicate"),)


# ---------------------------------------------------------------------------------------------
# Configs

def _common_config(**kw) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.batch_size = 128           # global batch; must be a multiple of the device count
  c.logit_scale = 100.0        # CLIP's logit_scale.exp()
  c.weight_decay = 1e-5        # L2 added to the gradient before the optimiser (torch semantics)
  c.seed = 0                   # data order (and stage-2 init)
  c.checkpoint_every = 500     # steps; epoch ends are always saved as well
  c.max_to_keep = 2
  c.progress_every_secs = 30.0
  c.tensorboard = True         # only if tensorboardX is importable
  c.update(kw)
  return c


def default_stage2_config() -> ml_collections.ConfigDict:
  """Stage 2 (`ind_ood_projection.py`): residual Linear-LayerNorm-ReLU projection, Adam, 3 epochs."""
  return _common_config(
      subdir="stage2_projection",
      epochs=3,
      lr=1e-3,
      eta_min=1e-5,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      layernorm_eps=1e-5,
      normalize_inputs=False,   # official: raw CLIP image embeddings go into the projection
  )


def default_stage3_config() -> ml_collections.ConfigDict:
  """Stage 3 (`ood_label_finetuning.py`): trainable negative text features, SGD momentum, 5 epochs."""
  return _common_config(
      subdir="stage3_negatives",
      epochs=5,
      lr=2e-2,
      eta_min=0.0,              # torch CosineAnnealingLR default, as in the official script
      momentum=0.9,
      keep_epoch=1,             # features after this many epochs are returned (official: epoch_0.pth)
  )


# ---------------------------------------------------------------------------------------------
# Models and losses

def torch_linear_init(fan_in: int):
  """PyTorch nn.Linear default init: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  Used for both kernel and bias (torch draws the bias from the same bound).
  """
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class Projection(nn.Module):
  """torch `Sequential(Linear(d, d), LayerNorm(d), ReLU())`; Flax names '0', '1' as its state dict."""
  layernorm_eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(d, kernel_init=torch_linear_init(d), bias_init=torch_linear_init(d), name="0")(x)
    x = nn.LayerNorm(epsilon=self.layernorm_eps, use_fast_variance=False, name="1")(x)
    return nn.relu(x)


def l2_normalize(x, eps: float = 1e-12):
  """torch.nn.functional.normalize: x / max(||x||, eps)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def init_projection(dim: int, seed: int = 0, layernorm_eps: float = 1e-5) -> dict:
  """Stage-2 projection params for features of size `dim` ({'params': {'0': ..., '1': ...}})."""
  return Projection(layernorm_eps).init(jax.random.PRNGKey(seed), jnp.zeros((1, dim), jnp.float32))


def apply_projection(params, f, layernorm_eps: float = 1e-5, normalize_inputs: bool = False):
  """f' = normalize(f + P(f)) for image features `f` (..., D)."""
  f = jnp.asarray(f, jnp.float32)
  if normalize_inputs:
    f = l2_normalize(f)
  return l2_normalize(f + Projection(layernorm_eps).apply(params, f))


def _masked_ce(logits, labels, mask):
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  mask = mask.astype(logits.dtype)
  denom = jnp.maximum(mask.sum(), 1.0)
  loss = (ce * mask).sum() / denom
  acc = ((jnp.argmax(logits, -1) == labels).astype(logits.dtype) * mask).sum() / denom
  return loss, {"accuracy": acc}


def stage2_labels(id_labels, neg_labels, num_classes: int) -> np.ndarray:
  """Stage-2 targets: ID images keep their class, synthetic images get `num_classes + mined index`."""
  return np.concatenate([np.asarray(id_labels, np.int32),
                         num_classes + np.asarray(neg_labels, np.int32)])


# ---------------------------------------------------------------------------------------------
# Optimisers (torch semantics)

def epoch_cosine_schedule(lr: float, eta_min: float, epochs: int, steps_per_epoch: int):
  """torch CosineAnnealingLR(T_max=epochs, eta_min) stepped once per epoch, as a per-update schedule."""
  def schedule(count):
    epoch = count // steps_per_epoch
    return eta_min + (lr - eta_min) * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))
  return schedule


def epoch_lr(config, epoch: int) -> float:
  return config.eta_min + (config.lr - config.eta_min) * 0.5 * (1 + math.cos(math.pi * epoch / config.epochs))


def stage2_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  """torch.optim.Adam(lr, weight_decay): g + wd * p, then Adam (not AdamW), cosine per epoch."""
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
      optax.scale_by_learning_rate(
          epoch_cosine_schedule(config.lr, config.eta_min, config.epochs, steps_per_epoch)))


def stage3_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  """torch.optim.SGD(lr, momentum, dampening=0, weight_decay): buf = m * buf + (g + wd * p)."""
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.trace(decay=config.momentum, nesterov=False),
      optax.scale_by_learning_rate(
          epoch_cosine_schedule(config.lr, config.eta_min, config.epochs, steps_per_epoch)))


# ---------------------------------------------------------------------------------------------
# Data order: step -> (epoch, position) -> rows

def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  return -(-num_examples // batch_size)


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
# The shared training loop

class _MetricWriter:
  """metrics.jsonl (+ TensorBoard if available) on process 0; drops rows past a restored step."""

  def __init__(self, folder: str, start_step: int, tensorboard: bool):
    self.path = os.path.join(folder, "metrics.jsonl")
    self.enabled = jax.process_index() == 0
    self._tb = None
    if not self.enabled:
      return
    if os.path.exists(self.path):
      with open(self.path) as f:
        rows = [line for line in f if line.strip()]
      kept = []
      for line in rows:
        try:
          if json.loads(line)["step"] <= start_step:
            kept.append(line)
        except (json.JSONDecodeError, KeyError):
          pass  # a line cut by a kill
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, self.path)
    self._f = open(self.path, "a", buffering=1)  # line-buffered: a killed job loses no written row
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # optional
        self._tb = SummaryWriter(os.path.join(folder, "tensorboard"))
      except ImportError:
        self._tb = None

  def write(self, row: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    self._f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, row["step"])

  def sync(self) -> None:
    """Rows on disk before a checkpoint names their step (survives a host crash, not only kill -9)."""
    if self.enabled:
      self._f.flush()
      os.fsync(self._f.fileno())
      if self._tb is not None:
        self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._f.close()
      if self._tb is not None:
        self._tb.close()


def _check_run_file(folder: str, run: Mapping[str, Any]) -> None:
  path = os.path.join(folder, "run.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    diff = {k: (old.get(k), v) for k, v in run.items() if old.get(k) != v}
    if diff:
      raise ValueError(f"{path}: this workdir holds a run with other settings (old, new): {diff}; "
                       "use a fresh workdir or the same data and config")
  elif jax.process_index() == 0:
    with open(path + ".tmp", "w") as f:
      json.dump(dict(run), f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def _train(config, *, name: str, params, tx, loss_fn: Callable, features: np.ndarray, labels: np.ndarray,
           consts, workdir: str, mesh, run_info: Mapping[str, Any],
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
  folder = os.path.join(workdir, config.subdir)
  os.makedirs(folder, exist_ok=True)
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
      os.path.abspath(os.path.join(folder, "checkpoints")),
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


def _as_features(name: str, x, ndim: int = 2) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != ndim:
    raise ValueError(f"{name}: expected a {ndim}-d array, got shape {x.shape}")
  return x.astype(np.float32, copy=False)


def _host_normalize(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------------
# Stage 2

def stage2_loss_fn(config) -> Callable:
  """loss(params, {'text': T}, {'x': f, 'y': labels, 'mask': 0/1}) -> (masked mean CE, {'accuracy'})."""
  ln_eps, norm_in, scale = float(config.layernorm_eps), bool(config.normalize_inputs), float(config.logit_scale)

  def loss_fn(params, consts, batch):
    f = apply_projection(params, batch["x"], ln_eps, norm_in)
    logits = scale * f @ consts["text"].T
    return _masked_ce(logits, batch["y"], batch["mask"])
  return loss_fn


def train_projection(config, features, labels, text_features, workdir: str, mesh=None, *,
                     initial_params=None, on_step=None):
  """Trains the stage-2 projection; returns its params ({'params': {'0': Dense, '1': LayerNorm}}).

  features: (N, D) frozen CLIP image embeddings (ID images then synthetic ones, any order).
  labels: (N,) targets in [0, C + M): ID class, or C + mined negative index (see `stage2_labels`).
  text_features: (C + M, D) frozen text features [ID prompts; mined negatives] (L2-normalised here).
  initial_params: defaults to `init_projection(D, config.seed)`.
  on_step(step, metrics_row): optional hook after each step's metrics are written.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  features = _as_features("features", features)
  text = _host_normalize(_as_features("text_features", text_features))
  labels = np.asarray(labels)
  d = features.shape[1]
  if text.shape[1] != d:
    raise ValueError(f"text_features: shape {text.shape}, features have dimension {d}")
  if labels.size and (labels.min() < 0 or labels.max() >= text.shape[0]):
    raise ValueError(f"labels: values in [{labels.min()}, {labels.max()}], text_features has "
                     f"{text.shape[0]} rows")
  if initial_params is None:
    initial_params = init_projection(d, config.seed, config.layernorm_eps)
  spe = steps_per_epoch(features.shape[0], config.batch_size)
  loss_fn = stage2_loss_fn(config)
  state = _train(config, name="stage2", params=initial_params, tx=stage2_optimizer(config, spe),
                 loss_fn=loss_fn, features=features, labels=labels, consts={"text": text},
                 workdir=workdir, mesh=mesh, on_step=on_step,
                 run_info={"stage": 2, "dim": d, "num_text": int(text.shape[0])})
  return parallel.to_host(state.params)


# ---------------------------------------------------------------------------------------------
# Stage 3

def stage3_logits(negatives, f, logit_scale: float = 100.0):
  """100 * cos(f, E): image features (B, D) against negative text features (M, D)."""
  return logit_scale * l2_normalize(f) @ l2_normalize(negatives).T


def negatives_path(workdir: str, config, epoch: int) -> str:
  return os.path.join(workdir, config.subdir, "features", f"after_epoch_{epoch}.npy")


def train_negative_features(config, features, labels, neg_features, workdir: str, mesh=None, *,
                            on_step=None) -> np.ndarray:
  """Trains the negatives' text features; returns those after `config.keep_epoch` epochs (M, D).

  features: (N, D) frozen CLIP image embeddings of the synthetic images.
  labels: (N,) mined label of each image, an index into the rows of `neg_features`.
  neg_features: (M, D) the mined negatives' text features (the initial value of the trained E).
  Features after every epoch are saved as `{workdir}/{subdir}/features/after_epoch_{k}.npy` (raw E:
  only its direction matters, consumers L2-normalise). keep_epoch 0/None returns the final ones.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  features = _as_features("features", features)
  neg = _as_features("neg_features", neg_features)
  labels = np.asarray(labels)
  if neg.shape[1] != features.shape[1]:
    raise ValueError(f"neg_features: shape {neg.shape}, features have dimension {features.shape[1]}")
  if labels.size and (labels.min() < 0 or labels.max() >= neg.shape[0]):
    raise ValueError(f"labels: values in [{labels.min()}, {labels.max()}], neg_features has "
                     f"{neg.shape[0]} rows")
  keep = int(config.keep_epoch or 0)
  if keep < 0 or keep > config.epochs:
    raise ValueError(f"config.keep_epoch={keep} must be in [0, epochs={config.epochs}]")
  spe = steps_per_epoch(features.shape[0], config.batch_size)
  scale = float(config.logit_scale)

  def loss_fn(params, consts, batch):
    del consts
    return _masked_ce(stage3_logits(params["negatives"], batch["x"], scale), batch["y"], batch["mask"])

  def save_features(epoch, state):
    e = parallel.to_host(state.params["negatives"])
    if jax.process_index() == 0:
      path = negatives_path(workdir, config, epoch)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path + ".tmp", "wb") as f:
        np.save(f, e)
      os.replace(path + ".tmp", path)

  state = _train(config, name="stage3", params={"negatives": neg}, tx=stage3_optimizer(config, spe),
                 loss_fn=loss_fn, features=features, labels=labels, consts={}, workdir=workdir,
                 mesh=mesh, on_step=on_step, on_epoch_end=save_features,
                 run_info={"stage": 3, "dim": int(neg.shape[1]), "num_negatives": int(neg.shape[0])})
  if not keep or keep == config.epochs:
    return parallel.to_host(state.params["negatives"])
  path = negatives_path(workdir, config, keep)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: the features after epoch {keep} are missing from the workdir")
  return np.load(path)

"""SynOOD stage 3 (text side): CE over 100 cos(f, E), E = the mined negatives' text features, trained.

What the official `ood_label_finetuning.py` does and what is matched here: both sides are normalised
inside the logits; SGD(lr 2e-2, momentum 0.9, dampening 0, weight_decay 1e-5),
CosineAnnealingLR(T_max=epochs) (eta_min 0), 5 epochs, batch 128. The official code saves the features
after every epoch and loads `epoch_0.pth`, i.e. after the FIRST epoch: `keep_epoch=1` here (1-based
count of completed epochs; 0 or None keeps the final ones). The loop itself is `train.loop`.
"""
from __future__ import annotations

import io
import os

import numpy as np
import optax

from synood_jax import fileio, parallel, runtime
from synood_jax.train import loop
from synood_jax.models.zero_shot import l2_normalize


def stage3_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  """torch.optim.SGD(lr, momentum, dampening=0, weight_decay): buf = m * buf + (g + wd * p)."""
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.trace(decay=config.momentum, nesterov=False),
      optax.scale_by_learning_rate(
          loop.epoch_cosine_schedule(config.lr, config.eta_min, config.epochs, steps_per_epoch)))


def stage3_logits(negatives, f, logit_scale: float = 100.0):
  """100 * cos(f, E): image features (B, D) against negative text features (M, D)."""
  return logit_scale * l2_normalize(f) @ l2_normalize(negatives).T


def negatives_path(folder: str, epoch: int) -> str:
  return os.path.join(folder, "features", f"after_epoch_{epoch}.npy")


def train_negative_features(config, features, labels, neg_features, folder: str, mesh=None, *,
                            on_step=None) -> np.ndarray:
  """Trains the negatives' text features; returns those after `config.keep_epoch` epochs (M, D).

  features: (N, D) frozen CLIP image embeddings of the synthetic images.
  labels: (N,) mined label of each image, an index into the rows of `neg_features`.
  neg_features: (M, D) the mined negatives' text features (the initial value of the trained E).
  Features after every epoch are saved as `{folder}/features/after_epoch_{k}.npy` (raw E:
  only its direction matters, consumers L2-normalise). keep_epoch 0/None returns the final ones.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  features = loop.as_features("features", features)
  neg = loop.as_features("neg_features", neg_features)
  labels = np.asarray(labels)
  if neg.shape[1] != features.shape[1]:
    raise ValueError(f"neg_features: shape {neg.shape}, features have dimension {features.shape[1]}")
  if labels.size and (labels.min() < 0 or labels.max() >= neg.shape[0]):
    raise ValueError(f"labels: values in [{labels.min()}, {labels.max()}], neg_features has "
                     f"{neg.shape[0]} rows")
  keep = int(config.keep_epoch or 0)
  if keep < 0 or keep > config.epochs:
    raise ValueError(f"config.keep_epoch={keep} must be in [0, epochs={config.epochs}]")
  spe = loop.steps_per_epoch(features.shape[0], config.batch_size)
  scale = float(config.logit_scale)

  def loss_fn(params, consts, batch):
    del consts
    return loop.masked_ce(stage3_logits(params["negatives"], batch["x"], scale), batch["y"], batch["mask"])

  def save_features(epoch, state):
    e = parallel.to_host(state.params["negatives"])
    if fileio.is_writer():
      fileio.atomic_write(negatives_path(folder, epoch), lambda f: np.save(f, e))

  state = loop.train(config, name="stage3", params={"negatives": neg}, tx=stage3_optimizer(config, spe),
                 loss_fn=loss_fn, features=features, labels=labels, consts={}, folder=folder,
                 mesh=mesh, on_step=on_step, on_epoch_end=save_features,
                 run_info={"stage": 3, "dim": int(neg.shape[1]), "num_negatives": int(neg.shape[0])})
  if not keep or keep == config.epochs:
    return parallel.to_host(state.params["negatives"])
  path = negatives_path(folder, keep)
  runtime.barrier("stage3: features after each epoch saved")  # process 0 saved them
  if not fileio.exists(path):
    raise FileNotFoundError(f"{path}: the features after epoch {keep} are missing from the workdir")
  with fileio.open_file(path) as f:
    return np.load(io.BytesIO(f.read()))

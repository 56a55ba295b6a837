"""SynOOD stage 2 (image side) on cached (frozen) CLIP features; stage 3 is `train.negatives`.

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
"""
from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from synood_jax import parallel
from synood_jax.train import loop
from synood_jax.models.zero_shot import l2_normalize



# ---------------------------------------------------------------------------------------------
# Model

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


def init_projection(dim: int, seed: int = 0, layernorm_eps: float = 1e-5) -> dict:
  """Stage-2 projection params for features of size `dim` ({'params': {'0': ..., '1': ...}})."""
  return Projection(layernorm_eps).init(jax.random.PRNGKey(seed), jnp.zeros((1, dim), jnp.float32))


def apply_projection(params, f, layernorm_eps: float = 1e-5, normalize_inputs: bool = False):
  """f' = normalize(f + P(f)) for image features `f` (..., D)."""
  f = jnp.asarray(f, jnp.float32)
  if normalize_inputs:
    f = l2_normalize(f)
  return l2_normalize(f + Projection(layernorm_eps).apply(params, f))


def stage2_labels(id_labels, neg_labels, num_classes: int) -> np.ndarray:
  """Stage-2 targets: ID images keep their class, synthetic images get `num_classes + mined index`."""
  return np.concatenate([np.asarray(id_labels, np.int32),
                         num_classes + np.asarray(neg_labels, np.int32)])


def stage2_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  """torch.optim.Adam(lr, weight_decay): g + wd * p, then Adam (not AdamW), cosine per epoch."""
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
      optax.scale_by_learning_rate(
          loop.epoch_cosine_schedule(config.lr, config.eta_min, config.epochs, steps_per_epoch)))




# ---------------------------------------------------------------------------------------------
# Training

def stage2_loss_fn(config) -> Callable:
  """loss(params, {'text': T}, {'x': f, 'y': labels, 'mask': 0/1}) -> (masked mean CE, {'accuracy'})."""
  ln_eps, norm_in, scale = float(config.layernorm_eps), bool(config.normalize_inputs), float(config.logit_scale)

  def loss_fn(params, consts, batch):
    f = apply_projection(params, batch["x"], ln_eps, norm_in)
    logits = scale * f @ consts["text"].T
    return loop.masked_ce(logits, batch["y"], batch["mask"])
  return loss_fn


def train_projection(config, features, labels, text_features, folder: str, mesh=None, *,
                     initial_params=None, on_step=None):
  """Trains the stage-2 projection; returns its params ({'params': {'0': Dense, '1': LayerNorm}}).

  features: (N, D) frozen CLIP image embeddings (ID images then synthetic ones, any order).
  labels: (N,) targets in [0, C + M): ID class, or C + mined negative index (see `stage2_labels`).
  text_features: (C + M, D) frozen text features [ID prompts; mined negatives] (L2-normalised here).
  initial_params: defaults to `init_projection(D, config.seed)`.
  on_step(step, metrics_row): optional hook after each step's metrics are written.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  features = loop.as_features("features", features)
  text = loop.host_normalize(loop.as_features("text_features", text_features))
  labels = np.asarray(labels)
  d = features.shape[1]
  if text.shape[1] != d:
    raise ValueError(f"text_features: shape {text.shape}, features have dimension {d}")
  if labels.size and (labels.min() < 0 or labels.max() >= text.shape[0]):
    raise ValueError(f"labels: values in [{labels.min()}, {labels.max()}], text_features has "
                     f"{text.shape[0]} rows")
  if initial_params is None:
    initial_params = init_projection(d, config.seed, config.layernorm_eps)
  spe = loop.steps_per_epoch(features.shape[0], config.batch_size)
  loss_fn = stage2_loss_fn(config)
  state = loop.train(config, name="stage2", params=initial_params, tx=stage2_optimizer(config, spe),
                 loss_fn=loss_fn, features=features, labels=labels, consts={"text": text},
                 folder=folder, mesh=mesh, on_step=on_step,
                 run_info={"stage": 2, "dim": d, "num_text": int(text.shape[0])})
  return parallel.to_host(state.params)



"""OOD scores from CLIP features (NegLabel, MCM) and from logits (MSP, energy, max-logit).

Every score is higher for in-distribution. Image and text features are L2-normalised rows, so
`img @ text.T` is the cosine; `logits = cos / T` (T = 0.01 gives CLIP's 100 * cos).
All functions are jnp and jittable; `group_negatives` is the host-side (numpy) part of NegLabel.
`METHODS` names the evaluation's built-in scores (`ood.evaluation`): a new one is a function and a line.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.nn import logsumexp

from synood_jax.models.zero_shot import l2_normalize


def group_negatives(num_neg: int, groups: int = 100, seed: int = 0,
                    permutation: np.ndarray | None = None) -> np.ndarray:
  """Index array [G, M // G] of negatives: drop the last M mod G, permute the rest, split in G rows.

  Order as NegLabel's `grouping`: the remainder is dropped *before* the permutation. The permutation
  is `np.random.default_rng(seed).permutation(M - M mod G)`; NegLabel used `torch.randperm` on CUDA
  after `torch.manual_seed(0)`, which numpy cannot reproduce: pass that permutation (length
  M - M mod G) as `permutation` to replay it exactly.
  """
  if groups < 1 or groups > num_neg:
    raise ValueError(f"group_negatives: groups={groups} must be in [1, num_neg={num_neg}]")
  keep = num_neg - num_neg % groups
  if permutation is None:
    perm = np.random.default_rng(seed).permutation(keep)
  else:
    perm = np.asarray(permutation, dtype=np.int64)
    if sorted(perm.tolist()) != list(range(keep)):
      raise ValueError(f"group_negatives: permutation of shape {perm.shape} is not a permutation "
                       f"of range({keep})")
  return perm.reshape(groups, keep // groups)


def cosine_logits(img: jax.Array, text: jax.Array, temperature: float = 0.01) -> jax.Array:
  """logits[n, c] = (img[n] . text[c]) / T."""
  return (img @ text.T) / temperature


def _id_mass(lse_id: jax.Array, lse_other: jax.Array) -> jax.Array:
  # sum_{c in ID} softmax([id, other])_c = e^{lse_id} / (e^{lse_id} + e^{lse_other}) = sigmoid(lse_id - lse_other)
  return jax.nn.sigmoid(lse_id - lse_other)


@functools.partial(jax.jit, static_argnames=("groups", "temperature", "seed"))
def neglabel_score(img: jax.Array, id_text: jax.Array, neg_text: jax.Array, groups: int = 100,
                   temperature: float = 0.01, seed: int = 0, index: jax.Array | None = None) -> jax.Array:
  """NegLabel grouped score [N]: S = 1/G sum_g sum_{c in ID} softmax([cos_ID, cos_{N_g}] / T)_c.

  N_g = negatives in row g of `group_negatives(M, groups, seed)` (or of `index` [G, K] if given).
  """
  if index is None:
    index = group_negatives(neg_text.shape[0], groups, seed)
  lse_id = logsumexp(cosine_logits(img, id_text, temperature), axis=-1)          # [N]
  neg_logits = jnp.einsum("nd,gkd->ngk", img, neg_text[index]) / temperature     # [N, G, K]
  lse_groups = logsumexp(neg_logits, axis=-1)                                    # [N, G]
  return jnp.mean(_id_mass(lse_id[:, None], lse_groups), axis=-1)


@functools.partial(jax.jit, static_argnames=("temperature",))
def neglabel_ungrouped(img: jax.Array, id_text: jax.Array, neg_text: jax.Array,
                       temperature: float = 0.01) -> jax.Array:
  """NegLabel without grouping [N]: S = sum_{c in ID} softmax([cos_ID, cos_neg] / T)_c."""
  lse_id = logsumexp(cosine_logits(img, id_text, temperature), axis=-1)
  lse_neg = logsumexp(cosine_logits(img, neg_text, temperature), axis=-1)
  return _id_mass(lse_id, lse_neg)


@functools.partial(jax.jit, static_argnames=("temperature",))
def mcm_score(img: jax.Array, id_text: jax.Array, temperature: float = 1.0) -> jax.Array:
  """MCM [N]: S = max_c softmax(cos(img, id_text) / T)_c, with T = 1 as in MCM."""
  return jnp.max(jax.nn.softmax(cosine_logits(img, id_text, temperature), axis=-1), axis=-1)


@functools.partial(jax.jit, static_argnames=("temperature",))
def energy_score(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Negative free energy [N]: S = T * logsumexp(logits / T)."""
  return temperature * logsumexp(logits / temperature, axis=-1)


@jax.jit
def msp_score(logits: jax.Array) -> jax.Array:
  """Maximum softmax probability [N]: S = max_c softmax(logits)_c."""
  return jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)


@jax.jit
def max_logit_score(logits: jax.Array) -> jax.Array:
  """Maximum logit [N]: S = max_c logits_c."""
  return jnp.max(logits, axis=-1)


# ------------------------------------------------------------------------------------------------
# The evaluation's built-in methods. Each: (ID class features [C, D] from its own templates
# (config.eval.templates), negative features [M, D] or None, the evaluation's Options) -> a score of raw
# image features [n, D] (normalised here). A new one: one function and one line in METHODS.

def _mcm_method(id_text, neg_text, o):
  del neg_text
  return lambda img: mcm_score(l2_normalize(img), id_text, temperature=o.mcm_temperature)


def _neglabel_method(id_text, neg_text, o):
  if neg_text is None:
    raise ValueError("evaluate: score 'neglabel' needs `negatives` (config.negatives.label_list or .corpus)")
  return lambda img: neglabel_score(l2_normalize(img), id_text, neg_text, groups=o.groups,
                                    temperature=o.temperature, seed=o.seed)


METHODS = {"mcm": _mcm_method, "neglabel": _neglabel_method}

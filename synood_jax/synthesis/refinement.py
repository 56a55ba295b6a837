"""Boundary refinement of the in-painting noise (SynOOD stage 1, the energy-gradient loop).

s = mean(g) - logsumexp(g);  L = sum_b (m - s_b)^2 / B_ref;  u = z0 / scaling_factor (the decoder's input)
  eps <- eps - r * dL/du                   (skip gradient: the official update)
  eps <- eps - r * (dz0/deps)^T dL/du      (exact: the skip's identity replaced by the sampler's Jacobian)

The official script divides the sampled latents by the VAE's scaling factor *before* it asks for their
gradient, so its update is dL/du = scaling_factor * dL/dz0; `r` here has the official meaning (r = 10
reproduces the paper). The exact mode pulls the same dL/du back through the sampler, so the two modes
differ only by that Jacobian.

Each iteration restarts from add_noise(z_in, eps, t0), samples to z0, decodes, classifies and updates
eps. The loop is three pure pieces (sample, update, outcome) over explicit param pytrees and one driver
(`run`) that works both on the pieces traced into one program (`refine`) and on separately jitted
pieces (synthesis); the models come in as functions (`Models`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from synood_jax import parallel
from synood_jax.synthesis import health

LOSSES = ("squared", "hinge", "msp_kl")
GRAD_MODES = ("skip", "exact")


def boundary_score(logits: jax.Array) -> jax.Array:
  """s = mean_c(g) - logsumexp_c(g) = mean_c log softmax(g): -log C at uniform, lower when peaked."""
  return jnp.mean(logits, axis=-1) - jax.nn.logsumexp(logits, axis=-1)


def boundary_loss(logits: jax.Array, kind: str = "squared", target=-5.0) -> jax.Array:
  """Per-image loss: 'squared' (m - s)^2 (official); 'hinge' relu(m - s)^2 (pushes s up to m while
  the image is more in-distribution than the boundary, leaves it alone beyond); 'msp_kl'
  KL(uniform || softmax(g)) = -log C - s, which pulls toward uniform.

  The official MSP variant passes probabilities where torch's kl_div expects log-probabilities, which
  makes its loss a constant with zero gradient; 'msp_kl' is the KL it meant.
  """
  s = boundary_score(logits)
  if kind == "squared":
    return (target - s) ** 2
  if kind == "hinge":
    return jax.nn.relu(target - s) ** 2
  if kind == "msp_kl":
    return -jnp.log(logits.shape[-1]) - s
  raise ValueError(f"refinement.loss: unknown loss {kind!r}; choose one of {LOSSES}")


@dataclasses.dataclass(frozen=True)
class RefineConfig:
  """What shapes the program: new values compile a new one."""
  iterations: int = 3          # K
  loss: str = "squared"
  grad_mode: str = "skip"
  decode_chunk: int = 0        # decode, and differentiate through the decoder, this many rows at a time (0: all)

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f"refinement.loss: {self.loss!r} is not one of {LOSSES}")
    if self.grad_mode not in GRAD_MODES:
      raise ValueError(f"refinement.grad_mode: {self.grad_mode!r} is not one of {GRAD_MODES}")
    if self.iterations < 1:
      raise ValueError(f"refinement.iterations must be >= 1, got {self.iterations}")
    if self.decode_chunk < 0:
      raise ValueError(f"synthesis.decode_chunk must be >= 0, got {self.decode_chunk}")


@flax.struct.dataclass
class Hyper:
  """The refinement's scalars, traced like guidance and strength: an ablation sweep over them reuses
  one compiled program. The official loss is a mean over its batch, so its step shrinks with the batch
  size; we sum each image's own loss (results do not depend on batch composition) and weight it by
  1 / reference_batch, so reference_batch = B gives every image the step of an official batch of B."""
  step_size: jax.Array          # r
  target: jax.Array             # m
  reference_batch: jax.Array

  @classmethod
  def make(cls, step_size: float = 10.0, target: float = -5.0, reference_batch: float = 1) -> "Hyper":
    if not reference_batch >= 1:
      raise ValueError(f"refinement.reference_batch must be >= 1, got {reference_batch}")
    # A non-finite r or m is not refused here: the images it spoils are marked `nonfinite` (health.py).
    return cls(*(np.float32(v) for v in (step_size, target, reference_batch)))


def image_loss(cfg: RefineConfig, hyper: Hyper, decode_fn: Callable, logits_fn: Callable, params, u):
  """(sum over the batch of per-image losses, (per-image losses, scores)) of decoder inputs u."""
  logits = logits_fn(params, decode_fn(params, u))
  per_image = boundary_loss(logits, cfg.loss, hyper.target)
  return jnp.sum(per_image), (per_image, boundary_score(logits))


def skip_gradient(cfg: RefineConfig, hyper: Hyper, decode_fn: Callable, logits_fn: Callable, params, u):
  """dL/du at the decoder's input u (the official update direction), with per-image losses and scores.

  The loss is a sum of per-image terms and the decoder and classifier treat rows independently, so the
  gradient of `decode_chunk` rows at a time is the whole batch's. Each chunk's forward and backward pass
  run inside one loop step, which keeps the decoder's saved activations (about 3 GB per 512 px row in
  float32) to one chunk's: the whole batch's did not fit a 139 GB GPU at 8 rows in float32."""
  def chunk(x):
    (_, (loss, s)), grad = jax.value_and_grad(
        lambda y: image_loss(cfg, hyper, decode_fn, logits_fn, params, y), has_aux=True)(x)
    return grad, loss, s
  return parallel.map_rows(chunk, u, cfg.decode_chunk)


class Models(NamedTuple):
  """The functions one batch's refinement is built from; any sampler, decoder or classifier fits."""
  noise: Callable    # eps -> z_t = add_noise(z_in, eps, t0)
  sample: Callable   # (params, z_t) -> z0 (scaled latents)
  input: Callable    # z0 -> u, the decoder's input (z0 / scaling_factor)
  decode: Callable   # (params, u) -> images in [0, 1], NHWC
  logits: Callable   # (params, images) -> logits [B, C]


# The three pieces of the loop. Each is pure and may be jitted on its own (synthesis runs them as
# separate programs on a host loop) or traced together inside one program (`refine`).

def sample(models: Models, params, eps: jax.Array) -> jax.Array:
  """z0 = Sampler(add_noise(z_in, eps, t0))."""
  return models.sample(params, models.noise(eps))


def update(cfg: RefineConfig, hyper: Hyper, models: Models, params, eps: jax.Array, z0: jax.Array | None):
  """One refinement update: (eps', ok [B], loss [B], s [B]). Skip mode takes the z0 that `sample` made
  from this eps; exact mode (z0 None) samples again under a VJP to pull dL/du back to eps. An image whose
  update is non-finite keeps its eps (ok False)."""
  scale = hyper.step_size / hyper.reference_batch
  if cfg.grad_mode == "skip":
    grad, loss, s = skip_gradient(cfg, hyper, models.decode, models.logits, params, models.input(z0))
  else:
    z0, pullback = jax.vjp(lambda e: sample(models, params, e), eps)
    grad_u, loss, s = skip_gradient(cfg, hyper, models.decode, models.logits, params, models.input(z0))
    (grad,) = pullback(grad_u.astype(z0.dtype))
  eps, ok = health.finite_step(eps, eps - scale * grad.astype(eps.dtype))
  return eps, ok, loss, s


def outcome(cfg: RefineConfig, hyper: Hyper, models: Models, params, z0: jax.Array, history):
  """The last iteration's images and, with the earlier iterations' `history` ((ok, loss, s) each):
  (images, scores [K, B], losses [K, B], steps_finite [B])."""
  images = models.decode(params, models.input(z0))
  logits = models.logits(params, images)
  oks = [h[0] for h in history]
  losses = [h[1] for h in history] + [boundary_loss(logits, cfg.loss, hyper.target)]
  scores = [h[2] for h in history] + [boundary_score(logits)]
  finite = jnp.all(jnp.stack(oks), axis=0) if oks else jnp.ones(z0.shape[:1], bool)
  return images, jnp.stack(scores), jnp.stack(losses), finite


def run(cfg: RefineConfig, sample_fn: Callable, update_fn: Callable, outcome_fn: Callable, eps: jax.Array):
  """K refinement iterations over the pieces, bound to one batch: sample_fn(eps) -> z0,
  update_fn(eps, z0 | None) -> (eps', ok, loss, s), outcome_fn(z0, history) -> (images, scores, losses,
  steps_finite). Returns (images, scores [K, B], losses [K, B], eps, steps_finite [B]).

  The update after the last iteration is never used (the official code computes it anyway), so it is
  skipped. The loop is a Python loop: traced inside one jit it unrolls (a rolled lax.scan made XLA:CPU
  run the gradient's transposed convolutions on its generic thunk, 1.5x slower: README, "Synthesis
  speed"); over separately jitted pieces it is a host loop that dispatches asynchronously.
  """
  history = []
  for _ in range(cfg.iterations - 1):
    z0 = sample_fn(eps) if cfg.grad_mode == "skip" else None
    eps, *step = update_fn(eps, z0)
    history.append(tuple(step))
  images, scores, losses, finite = outcome_fn(sample_fn(eps), tuple(history))
  return images, scores, losses, eps, finite


def refine(cfg: RefineConfig, hyper: Hyper, models: Models, params, eps: jax.Array):
  """All K iterations as one traceable function (the pieces traced together): see `run`."""
  return run(cfg, lambda e: sample(models, params, e),
             lambda e, z0: update(cfg, hyper, models, params, e, z0),
             lambda z0, history: outcome(cfg, hyper, models, params, z0, history), eps)

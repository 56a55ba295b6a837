"""What every scheduler kind shares: the static `Scheduler` (kind + full config), the jittable
`SchedulerState`, the `Kind` record a scheduling_*.py file fills in, and the noise schedule
a_t = prod_{s <= t} (1 - beta_s) computed as torch computes it (float32, bit for bit)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np


class SchedulerConfigError(ValueError):
  """A scheduler config (or its file) that this module cannot follow; the message names the key or file."""


# diffusers' defaults every scheduler class takes (diffusers 0.42); a kind adds its own.
COMMON = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
          "trained_betas": None, "prediction_type": "epsilon", "timestep_spacing": "leading",
          "steps_offset": 0}
# key -> allowed values, for the keys every kind takes; a kind adds its own in `Kind.supported`.
COMMON_SUPPORTED = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "prediction_type": ("epsilon", "v_prediction"),
}


def freeze(v):
  return tuple(freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


@dataclasses.dataclass(frozen=True)
class Scheduler:
  """Static description of a scheduler: `kind` plus its full config (defaults filled in), hashable."""
  kind: str
  items: tuple  # sorted (key, value) pairs

  @property
  def config(self) -> dict:
    return dict(self.items)

  def __getattr__(self, name):  # config keys as attributes: sched.num_train_timesteps
    if name.startswith("__"):
      raise AttributeError(name)
    for k, v in self.items:
      if k == name:
        return v
    raise AttributeError(f"Scheduler({self.kind!r}) has no config key {name!r}")

  @property
  def order(self) -> int:
    """diffusers' `scheduler.order`: 1 for all three in diffusers 0.42 (PNDM included)."""
    return 1

  @property
  def init_noise_sigma(self) -> float:
    return 1.0


def _noise_coefficients(a):
  return jnp.sqrt(a), jnp.sqrt(1.0 - a)


def _no_sigmas(sched, ac, ts):
  del sched, ac
  return np.zeros((ts.size + 1,), np.float32)


@dataclasses.dataclass(frozen=True)
class Kind:
  """One scheduler kind (a diffusers class): what `schedulers.py` dispatches on `Scheduler.kind`."""
  name: str                        # 'ddim'
  class_name: str                  # diffusers' class: 'DDIMScheduler'
  aliases: tuple[str, ...]         # other names users give it ('plms')
  defaults: dict                   # the class's __init__ defaults (COMMON included)
  supported: dict                  # key -> allowed values, beyond COMMON_SUPPORTED
  timesteps: Callable[[Any, int], np.ndarray]   # (sched, num_inference_steps) -> diffusers' table
  step: Callable                   # (sched, state, model_output, i, sample) -> (prev_sample, state)
  history: int = 0                 # model outputs kept between steps
  keeps_sample: bool = False       # PNDM's stored sample
  sigmas: Callable = _no_sigmas    # (sched, alphas_cumprod, table) -> [len(table) + 1]
  noise_coefficients: Callable = _noise_coefficients  # a_t -> (alpha, sigma) of add_noise


# ----------------------------------------------------------------------------------------------------
# Host-side tables (numpy, reproducing torch's float32 arithmetic where it matters).

def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
  """torch.linspace(start, end, n, dtype=float32) bit for bit (fused multiply-add from both ends)."""
  if n == 1:
    return np.array([start], np.float32)
  f32 = np.float32
  step = np.float64(f32((f32(end) - f32(start)) / f32(n - 1)))
  i = np.arange(n, dtype=np.float64)
  out = np.where(i < n // 2, np.float64(f32(start)) + step * i, np.float64(f32(end)) - step * (n - 1 - i))
  return out.astype(np.float32)


def _betas(sched: Scheduler) -> np.ndarray:
  n = sched.num_train_timesteps
  if sched.trained_betas is not None:
    return np.asarray(sched.trained_betas, np.float32)
  if sched.beta_schedule == "linear":
    return _linspace_f32(sched.beta_start, sched.beta_end, n)
  if sched.beta_schedule == "scaled_linear":
    return np.square(_linspace_f32(sched.beta_start ** 0.5, sched.beta_end ** 0.5, n))
  # squaredcos_cap_v2 (Glide cosine), computed in float64 like diffusers' betas_for_alpha_bar
  f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], np.float32)


def alphas_cumprod(sched: Scheduler) -> np.ndarray:
  """float32 cumulative product of (1 - beta); torch's cumprod accumulates in float64."""
  alphas = np.float32(1.0) - _betas(sched)
  return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def dpm_sigmas_all(ac: np.ndarray) -> np.ndarray:
  return np.sqrt((np.float32(1) - ac) / ac).astype(np.float32)


@flax.struct.dataclass
class SchedulerState:
  """Everything `step` needs. `timesteps` (int32, the table being run), `alphas_cumprod` (float32,
  num_train_timesteps), `final_alpha_cumprod`, `sigmas` (DPM-Solver: sigma at each table entry plus the
  final sigma), `counter` (step calls so far), `history` (PNDM: last 4 model outputs; DPM-Solver: last 2
  converted outputs; oldest first), `cur_sample` (PNDM's stored sample)."""
  timesteps: jax.Array
  alphas_cumprod: jax.Array
  final_alpha_cumprod: jax.Array
  sigmas: jax.Array
  counter: jax.Array
  history: jax.Array
  cur_sample: jax.Array
  num_inference_steps: int = flax.struct.field(pytree_node=False, default=0)


def alpha_at(state: SchedulerState, t):
  ac = state.alphas_cumprod
  return jnp.where(t >= 0, ac[jnp.clip(t, 0, ac.shape[0] - 1)], state.final_alpha_cumprod)


def sigma_to_alpha_sigma(sigma):
  alpha = 1.0 / jnp.sqrt(sigma * sigma + 1.0)
  return alpha, sigma * alpha



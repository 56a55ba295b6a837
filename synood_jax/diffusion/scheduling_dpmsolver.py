"""DPM-Solver++ 2M (diffusers 0.42 `DPMSolverMultistepScheduler`): in sigma_t = sqrt((1 - a_t) / a_t) and
lambda_t = log(alpha_t / sigma_t), first order on the first (and, with lower_order_final, the last)
step, second order (midpoint or heun) between."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from synood_jax.diffusion import scheduler_state as S


def timesteps(sched, n: int) -> np.ndarray:
  # lambda_min_clipped = -inf, so the last usable timestep is num_train_timesteps
  n_train, spacing, offset = sched.num_train_timesteps, sched.timestep_spacing, sched.steps_offset
  last = n_train
  if spacing == "linspace":
    ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
  elif spacing == "leading":
    ratio = last // (n + 1)
    ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + offset
  else:
    ts = np.arange(last, 0, -n_train / n).round().astype(np.int64) - 1
  return ts.copy()


def sigmas(sched, ac: np.ndarray, ts: np.ndarray) -> np.ndarray:
  """sigma at each table entry, then the final sigma."""
  all_sigmas = S.dpm_sigmas_all(ac)
  last = all_sigmas[0] if sched.final_sigmas_type == "sigma_min" else np.float32(0)
  return np.concatenate([all_sigmas[ts], [last]]).astype(np.float32)


def noise_coefficients(a):
  """add_noise through sigma_t, as diffusers does (with the pipeline's begin_index set, its
  sigmas[begin_index] is the sigma at the timestep)."""
  return S.sigma_to_alpha_sigma(jnp.sqrt((1.0 - a) / a))


def step(sched, state, mo, i, x):
  c = state.counter
  n_run = state.timesteps.shape[0]
  small = sched.lower_order_final and state.num_inference_steps < 15
  is_last = i == n_run - 1
  lower_final = is_last & (sched.euler_at_final or small or sched.final_sigmas_type == "zero")
  s0 = state.sigmas[i]
  alpha_s0, sigma_s0 = S.sigma_to_alpha_sigma(s0)
  if sched.prediction_type == "epsilon":
    x0 = (x - sigma_s0 * mo) / alpha_s0
  else:  # v_prediction
    x0 = alpha_s0 * x - sigma_s0 * mo
  hist = state.history
  hist = jnp.concatenate([hist[1:], jnp.broadcast_to(x0, hist.shape[1:])[None]], axis=0)
  alpha_t, sigma_t = S.sigma_to_alpha_sigma(state.sigmas[i + 1])
  lambda_t = jnp.log(alpha_t) - jnp.log(sigma_t)
  lambda_s0 = jnp.log(alpha_s0) - jnp.log(sigma_s0)
  h = lambda_t - lambda_s0

  def first():
    return (sigma_t / sigma_s0) * x - (alpha_t * (jnp.exp(-h) - 1.0)) * x0

  def second():
    alpha_s1, sigma_s1 = S.sigma_to_alpha_sigma(state.sigmas[jnp.maximum(i - 1, 0)])
    lambda_s1 = jnp.log(alpha_s1) - jnp.log(sigma_s1)
    m0, m1 = hist[1], hist[0]
    r0 = (lambda_s0 - lambda_s1) / h
    d0, d1 = m0, (1.0 / r0) * (m0 - m1)
    if sched.solver_type == "midpoint":
      return ((sigma_t / sigma_s0) * x - (alpha_t * (jnp.exp(-h) - 1.0)) * d0
              - 0.5 * (alpha_t * (jnp.exp(-h) - 1.0)) * d1)
    return ((sigma_t / sigma_s0) * x - (alpha_t * (jnp.exp(-h) - 1.0)) * d0
            + (alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0)) * d1)

  shape = jnp.broadcast_shapes(x.shape, x0.shape)
  f1 = lambda: jnp.broadcast_to(first(), shape)
  f2 = lambda: jnp.broadcast_to(second(), shape)
  if sched.solver_order == 1:
    prev_sample = f1()
  else:
    # solver_order 2 (lower_order_second only matters for order 3): first order or second order.
    prev_sample = jax.lax.cond((c < 1) | lower_final, f1, f2)
  return prev_sample, state.replace(counter=c + 1, history=hist)


KIND = S.Kind(
    name="dpmsolver_multistep", class_name="DPMSolverMultistepScheduler",
    aliases=("dpmsolver++", "dpm++2m", "dpmpp_2m"), timesteps=timesteps, step=step, history=2, sigmas=sigmas,
    noise_coefficients=noise_coefficients,
    defaults={
        **S.COMMON, "solver_order": 2, "thresholding": False, "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
        "lower_order_final": True, "euler_at_final": False, "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
        "use_flow_sigmas": False, "flow_shift": 1.0, "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"), "variance_type": None, "timestep_spacing": "linspace",
        "rescale_betas_zero_snr": False, "use_dynamic_shifting": False, "time_shift_type": "exponential"},
    supported={"thresholding": (False,), "rescale_betas_zero_snr": (False,),
               "solver_order": (1, 2), "algorithm_type": ("dpmsolver++",), "solver_type": ("midpoint", "heun"),
               "lower_order_final": (True, False), "euler_at_final": (True, False),
               "use_karras_sigmas": (False,), "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
               "use_lu_lambdas": (False,), "use_flow_sigmas": (False,), "use_dynamic_shifting": (False,),
               "final_sigmas_type": ("zero", "sigma_min"), "lambda_min_clipped": (-float("inf"),),
               "variance_type": (None,)})

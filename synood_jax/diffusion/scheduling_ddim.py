"""DDIM (diffusers 0.42 `DDIMScheduler`, eta 0):
x_{t-d} = sqrt(a_{t-d}) x0 + sqrt(1 - a_{t-d}) eps,  x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from synood_jax.diffusion import scheduler_state as S


def timesteps(sched, n: int) -> np.ndarray:
  n_train, spacing, offset = sched.num_train_timesteps, sched.timestep_spacing, sched.steps_offset
  if spacing == "linspace":
    ts = np.linspace(0, n_train - 1, n).round()[::-1].astype(np.int64)
  elif spacing == "leading":
    ts = (np.arange(0, n) * (n_train // n)).round()[::-1].astype(np.int64) + offset
  else:
    ts = np.round(np.arange(n_train, 0, -n_train / n)).astype(np.int64) - 1
  return ts.copy()


def step(sched, state, mo, i, x):
  t = state.timesteps[i]
  prev = t - sched.num_train_timesteps // state.num_inference_steps
  a_t = state.alphas_cumprod[t]
  a_prev = S.alpha_at(state, prev)
  b_t = 1.0 - a_t
  if sched.prediction_type == "epsilon":
    x0 = (x - jnp.sqrt(b_t) * mo) / jnp.sqrt(a_t)
    eps = mo
  else:  # v_prediction
    x0 = jnp.sqrt(a_t) * x - jnp.sqrt(b_t) * mo
    eps = jnp.sqrt(a_t) * mo + jnp.sqrt(b_t) * x
  if sched.clip_sample:
    r = sched.clip_sample_range
    x0 = jnp.clip(x0, -r, r)
  # eta = 0: no variance term.
  prev_sample = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps
  return prev_sample, state.replace(counter=state.counter + 1)


KIND = S.Kind(
    name="ddim", class_name="DDIMScheduler", aliases=(), timesteps=timesteps, step=step,
    defaults={**S.COMMON, "clip_sample": True, "set_alpha_to_one": True, "thresholding": False,
              "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0, "sample_max_value": 1.0,
              "rescale_betas_zero_snr": False},
    supported={"clip_sample": (True, False), "set_alpha_to_one": (True, False), "thresholding": (False,),
               "rescale_betas_zero_snr": (False,)})

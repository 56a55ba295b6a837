"""PNDM with skip_prk_steps (PLMS; diffusers 0.42 `PNDMScheduler`): a linear multistep over the last four
model outputs, then PNDM's formula (9); its table repeats its second timestep."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from synood_jax.diffusion import scheduler_state as S


def timesteps(sched, n: int) -> np.ndarray:
  """num_inference_steps + 1 entries: the second timestep is repeated."""
  n_train, spacing, offset = sched.num_train_timesteps, sched.timestep_spacing, sched.steps_offset
  if spacing == "linspace":
    base = np.linspace(0, n_train - 1, n).round().astype(np.int64)
  elif spacing == "leading":
    base = (np.arange(0, n) * (n_train // n)).round() + offset
  else:
    base = np.round(np.arange(n_train, 0, -n_train / n))[::-1].astype(np.int64) - 1
  ts = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
  return ts.astype(np.int64).copy()


def step(sched, state, mo, i, x):
  c = state.counter
  t = state.timesteps[i]
  ratio = sched.num_train_timesteps // state.num_inference_steps
  second = c == 1
  # diffusers: on the second call the step is redone from the stored sample, from t + ratio to t.
  t_cur = jnp.where(second, t + ratio, t)
  t_prev = jnp.where(second, t, t - ratio)
  ets = state.history
  appended = jnp.concatenate([ets[1:], jnp.broadcast_to(mo, ets.shape[1:])[None]], axis=0)
  ets = jnp.where(second, ets, appended)
  cur = state.cur_sample

  branches = [
      lambda: (mo, x, x),                                                         # counter 0
      lambda: ((mo + ets[3]) / 2, cur, jnp.zeros_like(cur)),                      # counter 1
      lambda: ((3 * ets[3] - ets[2]) / 2, x, cur),                                # 2 outputs
      lambda: ((23 * ets[3] - 16 * ets[2] + 5 * ets[1]) / 12, x, cur),            # 3 outputs
      lambda: ((1 / 24) * (55 * ets[3] - 59 * ets[2] + 37 * ets[1] - 9 * ets[0]), x, cur),
  ]
  shape = jnp.broadcast_shapes(mo.shape, x.shape, cur.shape)
  branches = [lambda f=f: tuple(jnp.broadcast_to(v, shape).astype(jnp.float32) for v in f())
              for f in branches]
  eff, sample, new_cur = jax.lax.switch(jnp.minimum(c, 4), branches)
  a_t = S.alpha_at(state, t_cur)
  a_prev = S.alpha_at(state, t_prev)
  b_t = 1.0 - a_t
  b_prev = 1.0 - a_prev
  if sched.prediction_type == "v_prediction":
    eff = jnp.sqrt(a_t) * eff + jnp.sqrt(b_t) * sample
  # PNDM formula (9)
  sample_coeff = jnp.sqrt(a_prev / a_t)
  denom = a_t * jnp.sqrt(b_prev) + jnp.sqrt(a_t * b_t * a_prev)
  prev_sample = sample_coeff * sample - (a_prev - a_t) * eff / denom
  return prev_sample, state.replace(counter=c + 1, history=ets, cur_sample=new_cur)


KIND = S.Kind(
    name="pndm", class_name="PNDMScheduler", aliases=("plms",), timesteps=timesteps, step=step,
    history=4, keeps_sample=True,
    defaults={**S.COMMON, "skip_prk_steps": False, "set_alpha_to_one": False},
    supported={"set_alpha_to_one": (True, False), "skip_prk_steps": (True,)})

"""Diffusion samplers as pure, jittable functions: DDIM, PNDM (PLMS, skip_prk_steps) and DPM-Solver++ 2M.

# DDIM: x_{t-d} = sqrt(a_{t-d}) x0 + sqrt(1 - a_{t-d}) eps, x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)

Semantics follow diffusers 0.42 `DDIMScheduler`, `PNDMScheduler` and `DPMSolverMultistepScheduler`
(step for step, float32), built from a diffusers `scheduler_config.json` with each class's own defaults
for missing keys (as `from_config` does: e.g. DPM-Solver's default `timestep_spacing` is "linspace",
DDIM's default `clip_sample` is True).

Host side (numpy): `make_scheduler` (diffusers' `from_config(config, **overrides)`),
`inpaint_pipeline_scheduler` (what StableDiffusionInpaintPipeline runs), `load_scheduler_config`,
`set_timesteps`, `get_timesteps`.
Device side (jnp, jittable, `sched` static): `init_state`, `step`, `add_noise`, `scale_model_input`.

Index-based stepping: `step(sched, state, model_output, i, sample)` where `i` indexes the timesteps
array given to `init_state` and may be traced (lax.fori_loop / scan); the model is evaluated at
`state.timesteps[i]`. The multistep history (PNDM `ets` / `counter`, DPM-Solver `model_outputs` /
`lower_order_nums`) is driven by `state.counter`, the number of `step` calls since `init_state`, exactly
as diffusers' counters are. Two equivalent ways to run a strength cut:
  - init_state on the cut table from `get_timesteps`, then i = 0 .. len(cut) - 1 (i == counter);
  - init_state on the full `set_timesteps` table, then call step only for i >= len(full) - len(cut)
    (diffusers' begin_index): the counter starts at 0 on the first executed step, as in diffusers.
The last table entry is the final step either way (DPM-Solver's lower_order_final). Re-run `init_state`
for every new trajectory (diffusers' pipeline calls `set_timesteps` on every call).

    sched = make_scheduler(load_scheduler_config(folder))
    timesteps, _ = get_timesteps(sched, 20, 0.6)
    state = init_state(sched, timesteps, latents.shape, num_inference_steps=20)
    x = add_noise(sched, z0, eps, timesteps[:1])
    def body(i, carry):
      x, state = carry
      t = state.timesteps[i]
      return step(sched, state, unet(scale_model_input(sched, x, t), t), i, x)
    x, state = jax.lax.fori_loop(0, len(timesteps), body, (x, state))
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np


class SchedulerConfigError(ValueError):
  """A scheduler config (or its file) that this module cannot follow; the message names the key or file."""


KINDS = ("ddim", "pndm", "dpmsolver_multistep")
_CLASS_NAMES = {
    "DDIMScheduler": "ddim", "PNDMScheduler": "pndm", "DPMSolverMultistepScheduler": "dpmsolver_multistep",
}
_ALIASES = {"ddim": "ddim", "pndm": "pndm", "plms": "pndm", "dpmsolver_multistep": "dpmsolver_multistep",
            "dpmsolver++": "dpmsolver_multistep", "dpm++2m": "dpmsolver_multistep",
            "dpmpp_2m": "dpmsolver_multistep"}

_COMMON = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
           "trained_betas": None, "prediction_type": "epsilon", "timestep_spacing": "leading",
           "steps_offset": 0}
# Each diffusers class's __init__ defaults (diffusers 0.42); keys a class does not take are ignored,
# as diffusers' from_config ignores them.
_DEFAULTS = {
    "ddim": {**_COMMON, "clip_sample": True, "set_alpha_to_one": True, "thresholding": False,
             "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0, "sample_max_value": 1.0,
             "rescale_betas_zero_snr": False},
    "pndm": {**_COMMON, "skip_prk_steps": False, "set_alpha_to_one": False},
    "dpmsolver_multistep": {
        **_COMMON, "solver_order": 2, "thresholding": False, "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
        "lower_order_final": True, "euler_at_final": False, "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
        "use_flow_sigmas": False, "flow_shift": 1.0, "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"), "variance_type": None, "timestep_spacing": "linspace",
        "rescale_betas_zero_snr": False, "use_dynamic_shifting": False, "time_shift_type": "exponential"},
}
# key -> allowed values (None: any value of the right type is fine).
_SUPPORTED = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "prediction_type": ("epsilon", "v_prediction"),
    "clip_sample": (True, False), "set_alpha_to_one": (True, False),
    "thresholding": (False,), "rescale_betas_zero_snr": (False,),
    "skip_prk_steps": (True,),
    "solver_order": (1, 2), "algorithm_type": ("dpmsolver++",), "solver_type": ("midpoint", "heun"),
    "lower_order_final": (True, False), "euler_at_final": (True, False),
    "use_karras_sigmas": (False,), "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,), "use_flow_sigmas": (False,), "use_dynamic_shifting": (False,),
    "final_sigmas_type": ("zero", "sigma_min"), "lambda_min_clipped": (-float("inf"),),
    "variance_type": (None,),
}


def _freeze(v):
  return tuple(_freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


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


def resolve_kind(name: str, key: str = "kind") -> str:
  """'ddim' / 'pndm' / 'dpmsolver_multistep' from a kind, an alias ('plms', 'dpm++2m') or a diffusers
  class name; `key` names the argument in the error."""
  k = _CLASS_NAMES.get(name) or _ALIASES.get(str(name).lower())
  if k is None:
    raise SchedulerConfigError(f"{key}={name!r} is not supported; use one of {sorted(_CLASS_NAMES)} "
                               f"or {sorted(_ALIASES)}")
  return k


def make_scheduler(config: Mapping[str, Any], kind: str | None = None, **overrides) -> Scheduler:
  """A `Scheduler` from a diffusers scheduler config dict, like diffusers' `Class.from_config(config,
  **overrides)`.

  The kind comes from `config["_class_name"]` unless `kind` is given ("ddim", "pndm",
  "dpmsolver_multistep" or a diffusers class name), which loads the config into another scheduler class
  like diffusers' `OtherScheduler.from_config(config)`: keys the class does not take are ignored, keys
  it takes but the config lacks get the class's defaults. `overrides` replace config values (a key the
  class does not take is an error). A value this module does not implement is refused with the
  override that would fix it.
  """
  if not isinstance(config, Mapping):
    raise SchedulerConfigError(f"scheduler config must be a dict, got {type(config).__name__}")
  name = kind if kind is not None else config.get("_class_name")
  if name is None:
    raise SchedulerConfigError("scheduler config has no '_class_name' and no kind was given")
  k = resolve_kind(name, "kind" if kind is not None else "_class_name")
  full = dict(_DEFAULTS[k])
  for key, value in config.items():
    if key in full:
      full[key] = value
  for key, value in overrides.items():
    if key not in full:
      raise SchedulerConfigError(f"scheduler override {key}={value!r}: {k} has no config key {key!r} "
                                 f"(its keys: {sorted(full)})")
    full[key] = value
  for key, allowed in _SUPPORTED.items():
    if key in full and full[key] not in allowed:
      fix = f"{key}={allowed[0]!r}"
      how = ("the override" if key in overrides else
             f"override it: make_scheduler(config, {k!r}, {fix}), or load_inpaint_pipeline(folder, "
             f"scheduler={k!r}, scheduler_overrides={{{key!r}: {allowed[0]!r}}})")
      raise SchedulerConfigError(
          f"scheduler config key {key!r}={full[key]!r} is not supported for {k} (supported: {allowed}); {how}")
  for key in ("num_train_timesteps", "steps_offset"):
    if not isinstance(full[key], (int, np.integer)) or isinstance(full[key], bool) or full[key] < 0:
      raise SchedulerConfigError(f"scheduler config key {key!r}={full[key]!r} must be a non-negative int")
  if full["num_train_timesteps"] < 1:
    raise SchedulerConfigError(f"scheduler config key 'num_train_timesteps'={full['num_train_timesteps']!r}")
  if full["trained_betas"] is not None and len(full["trained_betas"]) != full["num_train_timesteps"]:
    raise SchedulerConfigError(
        f"scheduler config key 'trained_betas' has {len(full['trained_betas'])} values, "
        f"num_train_timesteps is {full['num_train_timesteps']}")
  return Scheduler(k, tuple(sorted((key, _freeze(v)) for key, v in full.items())))


def inpaint_pipeline_scheduler(config: Mapping[str, Any], kind: str | None = None, **overrides) -> Scheduler:
  """The scheduler a diffusers Stable Diffusion (in-painting) pipeline runs with this config.

  StableDiffusionInpaintPipeline.__init__ rewrites two outdated fields of any scheduler it is given:
  `steps_offset` becomes 1, and PNDM's `skip_prk_steps` becomes True (so `scheduler="pndm"` works on a
  folder saved with DDIM, as `PNDMScheduler.from_config(cfg, skip_prk_steps=True)` does). `overrides`
  are applied after those.
  """
  name = kind if kind is not None else config.get("_class_name")
  if name is None:
    return make_scheduler(config, None, **overrides)  # raises: no class name
  k = resolve_kind(name, "kind" if kind is not None else "_class_name")
  fixes = {"steps_offset": 1, **({"skip_prk_steps": True} if k == "pndm" else {})}
  return make_scheduler(config, k, **{**fixes, **overrides})


def load_scheduler_config(folder: str) -> dict:
  """Read `scheduler_config.json` from `folder` (a scheduler folder, a pipeline folder with a
  `scheduler/` subfolder, or the json file itself)."""
  path = folder
  if os.path.isdir(folder):
    path = os.path.join(folder, "scheduler_config.json")
    sub = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path) and os.path.isfile(sub):
      path = sub
  if not os.path.isfile(path):
    raise SchedulerConfigError(f"{path}: no scheduler_config.json found (looked in {folder!r})")
  try:
    with open(path) as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise SchedulerConfigError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(config, dict):
    raise SchedulerConfigError(f"{path}: expected a JSON object, got {type(config).__name__}")
  return config


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


def _dpm_sigmas_all(ac: np.ndarray) -> np.ndarray:
  return np.sqrt((np.float32(1) - ac) / ac).astype(np.float32)


def set_timesteps(sched: Scheduler, num_inference_steps: int) -> np.ndarray:
  """diffusers' `scheduler.timesteps` after `set_timesteps(num_inference_steps)` (int64 numpy).

  PNDM with skip_prk_steps has num_inference_steps + 1 entries (its second timestep is repeated)."""
  n_train = sched.num_train_timesteps
  n = int(num_inference_steps)
  if n < 1:
    raise SchedulerConfigError(f"num_inference_steps={num_inference_steps!r} must be >= 1")
  if n > n_train:
    raise SchedulerConfigError(
        f"num_inference_steps={n} cannot be larger than num_train_timesteps={n_train}")
  spacing, offset = sched.timestep_spacing, sched.steps_offset
  if sched.kind == "ddim":
    if spacing == "linspace":
      ts = np.linspace(0, n_train - 1, n).round()[::-1].astype(np.int64)
    elif spacing == "leading":
      ts = (np.arange(0, n) * (n_train // n)).round()[::-1].astype(np.int64) + offset
    else:
      ts = np.round(np.arange(n_train, 0, -n_train / n)).astype(np.int64) - 1
    return ts.copy()
  if sched.kind == "pndm":
    if spacing == "linspace":
      base = np.linspace(0, n_train - 1, n).round().astype(np.int64)
    elif spacing == "leading":
      base = (np.arange(0, n) * (n_train // n)).round() + offset
    else:
      base = np.round(np.arange(n_train, 0, -n_train / n))[::-1].astype(np.int64) - 1
    ts = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
    return ts.astype(np.int64).copy()
  # dpmsolver_multistep (lambda_min_clipped = -inf, so the last usable timestep is num_train_timesteps)
  last = n_train
  if spacing == "linspace":
    ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
  elif spacing == "leading":
    ratio = last // (n + 1)
    ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + offset
  else:
    ts = np.arange(last, 0, -n_train / n).round().astype(np.int64) - 1
  return ts.copy()


def get_timesteps(sched: Scheduler, num_inference_steps: int, strength: float):
  """StableDiffusionInpaintPipeline.get_timesteps: (timesteps cut by strength, n_steps_run).

  The sampler runs the model once per entry of the returned timesteps; n_steps_run is what diffusers
  returns (num_inference_steps - t_start). For PNDM (skip_prk_steps, order 1 in diffusers 0.42) the
  table has num_inference_steps + 1 entries, so the cut table has n_steps_run + 1 entries (20 steps,
  strength 0.6: 13 model calls, n_steps_run 12), exactly as diffusers runs it."""
  full = set_timesteps(sched, num_inference_steps)
  init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
  t_start = max(num_inference_steps - init_timestep, 0)
  return full[t_start * sched.order:].copy(), num_inference_steps - t_start


def _infer_num_inference_steps(sched: Scheduler, timesteps: np.ndarray) -> int:
  n_have = len(timesteps)
  for n in range(max(1, n_have - 1), sched.num_train_timesteps + 1):
    full = set_timesteps(sched, n)
    if len(full) >= n_have and np.array_equal(full[len(full) - n_have:], timesteps):
      return n
  raise SchedulerConfigError(
      f"timesteps {timesteps.tolist()} are not a suffix of any {sched.kind} set_timesteps table; "
      "pass num_inference_steps= to init_state")


# ----------------------------------------------------------------------------------------------------
# Device side.

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


def init_state(sched: Scheduler, timesteps, sample_shape=None, num_inference_steps: int | None = None
               ) -> SchedulerState:
  """State for running `timesteps` (from `get_timesteps`/`set_timesteps`).

  sample_shape: shape of the latents (or an array with it); needed to size PNDM / DPM-Solver history
    buffers for lax loops. Without it the buffers are scalars that broadcast in an eager Python loop only.
  num_inference_steps: the step count given to `get_timesteps` (DDIM/PNDM step by
    num_train_timesteps // num_inference_steps; DPM-Solver's lower_order_final looks at it). Inferred
    from `timesteps` if omitted (the smallest count whose full table ends with `timesteps`).
  """
  ts = np.asarray(timesteps)
  if ts.ndim != 1 or ts.size == 0:
    raise SchedulerConfigError(f"timesteps must be a non-empty 1-D array, got shape {ts.shape}")
  if num_inference_steps is None:
    num_inference_steps = _infer_num_inference_steps(sched, ts)
  if hasattr(sample_shape, "shape"):
    sample_shape = sample_shape.shape
  shape = () if sample_shape is None else tuple(int(s) for s in sample_shape)
  ac = alphas_cumprod(sched)
  final = np.float32(1.0) if sched.config.get("set_alpha_to_one", False) else ac[0]
  if sched.kind == "dpmsolver_multistep":
    all_sigmas = _dpm_sigmas_all(ac)
    last = all_sigmas[0] if sched.final_sigmas_type == "sigma_min" else np.float32(0)
    sigmas = np.concatenate([all_sigmas[ts], [last]]).astype(np.float32)
  else:
    sigmas = np.zeros((ts.size + 1,), np.float32)
  n_hist = {"ddim": 0, "pndm": 4, "dpmsolver_multistep": 2}[sched.kind]
  hist = jnp.zeros((n_hist,) + shape, jnp.float32)
  cur = jnp.zeros(shape if sched.kind == "pndm" else (), jnp.float32)
  return SchedulerState(
      timesteps=jnp.asarray(ts, jnp.int32), alphas_cumprod=jnp.asarray(ac),
      final_alpha_cumprod=jnp.asarray(final, jnp.float32), sigmas=jnp.asarray(sigmas),
      counter=jnp.zeros((), jnp.int32), history=hist, cur_sample=cur,
      num_inference_steps=int(num_inference_steps))


def init_noise_sigma(sched: Scheduler) -> float:
  return sched.init_noise_sigma


def scale_model_input(sched: Scheduler, sample, timestep=None):
  """Identity for DDIM / PNDM / DPM-Solver (API symmetry with diffusers); returns float32."""
  del sched, timestep
  return jnp.asarray(sample, jnp.float32)


def _alpha_at(state: SchedulerState, t):
  ac = state.alphas_cumprod
  return jnp.where(t >= 0, ac[jnp.clip(t, 0, ac.shape[0] - 1)], state.final_alpha_cumprod)


def _sigma_to_alpha_sigma(sigma):
  alpha = 1.0 / jnp.sqrt(sigma * sigma + 1.0)
  return alpha, sigma * alpha


def add_noise(sched: Scheduler, original, noise, timesteps):
  """diffusers' add_noise: sqrt(a_t) x0 + sqrt(1 - a_t) eps, per batch element (timesteps: () or (B,)).

  DPM-Solver goes through sigma_t = sqrt((1 - a_t) / a_t) as diffusers does (with the pipeline's
  begin_index set, its sigmas[begin_index] is the sigma at `timesteps`)."""
  x0 = jnp.asarray(original, jnp.float32)
  eps = jnp.asarray(noise, jnp.float32)
  ac = jnp.asarray(alphas_cumprod(sched))
  t = jnp.asarray(timesteps, jnp.int32).reshape(-1)
  if t.shape[0] not in (1, x0.shape[0] if x0.ndim else 1):
    raise ValueError(f"add_noise: timesteps shape {tuple(t.shape)} does not match batch {x0.shape[:1]}")
  a = ac[t].reshape(t.shape + (1,) * max(x0.ndim - 1, 0))
  if sched.kind == "dpmsolver_multistep":
    alpha, sigma = _sigma_to_alpha_sigma(jnp.sqrt((1.0 - a) / a))
    return alpha * x0 + sigma * eps
  return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps


def _ddim_step(sched, state, mo, i, x):
  t = state.timesteps[i]
  prev = t - sched.num_train_timesteps // state.num_inference_steps
  a_t = state.alphas_cumprod[t]
  a_prev = _alpha_at(state, prev)
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


def _pndm_step(sched, state, mo, i, x):
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
  a_t = _alpha_at(state, t_cur)
  a_prev = _alpha_at(state, t_prev)
  b_t = 1.0 - a_t
  b_prev = 1.0 - a_prev
  if sched.prediction_type == "v_prediction":
    eff = jnp.sqrt(a_t) * eff + jnp.sqrt(b_t) * sample
  # PNDM formula (9)
  sample_coeff = jnp.sqrt(a_prev / a_t)
  denom = a_t * jnp.sqrt(b_prev) + jnp.sqrt(a_t * b_t * a_prev)
  prev_sample = sample_coeff * sample - (a_prev - a_t) * eff / denom
  return prev_sample, state.replace(counter=c + 1, history=ets, cur_sample=new_cur)


def _dpm_step(sched, state, mo, i, x):
  c = state.counter
  n_run = state.timesteps.shape[0]
  small = sched.lower_order_final and state.num_inference_steps < 15
  is_last = i == n_run - 1
  lower_final = is_last & (sched.euler_at_final or small or sched.final_sigmas_type == "zero")
  s0 = state.sigmas[i]
  alpha_s0, sigma_s0 = _sigma_to_alpha_sigma(s0)
  if sched.prediction_type == "epsilon":
    x0 = (x - sigma_s0 * mo) / alpha_s0
  else:  # v_prediction
    x0 = alpha_s0 * x - sigma_s0 * mo
  hist = state.history
  hist = jnp.concatenate([hist[1:], jnp.broadcast_to(x0, hist.shape[1:])[None]], axis=0)
  alpha_t, sigma_t = _sigma_to_alpha_sigma(state.sigmas[i + 1])
  lambda_t = jnp.log(alpha_t) - jnp.log(sigma_t)
  lambda_s0 = jnp.log(alpha_s0) - jnp.log(sigma_s0)
  h = lambda_t - lambda_s0

  def first():
    return (sigma_t / sigma_s0) * x - (alpha_t * (jnp.exp(-h) - 1.0)) * x0

  def second():
    alpha_s1, sigma_s1 = _sigma_to_alpha_sigma(state.sigmas[jnp.maximum(i - 1, 0)])
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


def step(sched: Scheduler, state: SchedulerState, model_output, timestep_index, sample):
  """One denoising step at `state.timesteps[timestep_index]` -> (prev_sample float32, new state).

  Jittable with `sched` static; `timestep_index` may be traced. Matches diffusers' `scheduler.step`
  (eta 0 for DDIM) when called once per entry of the table in order, starting with a fresh state."""
  mo = jnp.asarray(model_output, jnp.float32)
  x = jnp.asarray(sample, jnp.float32)
  i = jnp.asarray(timestep_index, jnp.int32)
  if mo.shape != x.shape:
    raise ValueError(f"step: model_output shape {mo.shape} != sample shape {x.shape}")
  if state.history.shape[1:] != x.shape:
    if state.history.ndim != 1:
      raise ValueError(f"step: state was built for sample shape {state.history.shape[1:]}, "
                       f"got sample shape {x.shape}")
    # built without sample_shape: size the buffers now (eager loops only; lax loops need sample_shape)
    state = state.replace(history=jnp.zeros(state.history.shape + x.shape, jnp.float32))
    if sched.kind == "pndm":
      state = state.replace(cur_sample=jnp.zeros(x.shape, jnp.float32))
  fn = {"ddim": _ddim_step, "pndm": _pndm_step, "dpmsolver_multistep": _dpm_step}[sched.kind]
  return fn(sched, state, mo, i, x)

"""Diffusion samplers as pure, jittable functions: DDIM, PNDM (PLMS, skip_prk_steps) and DPM-Solver++ 2M.

x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps; each kind steps x_t -> x_{t-d} from the model's eps (or v).

One file per kind (scheduling_ddim.py, scheduling_pndm.py, scheduling_dpmsolver.py: its defaults,
timestep table and step, as a `scheduler_state.Kind`) over the shared state (scheduler_state.py);
`KINDS` below is the one place `kind` is dispatched. A new kind: a scheduling_*.py and a line in KINDS.

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

import json
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from synood_jax.diffusion import scheduling_ddim, scheduling_dpmsolver, scheduling_pndm
from synood_jax.diffusion.scheduler_state import (COMMON_SUPPORTED, Scheduler, SchedulerConfigError,
                                                  SchedulerState, freeze, alphas_cumprod)

# The registry: kind -> its `scheduler_state.Kind` (defaults, table, step).
KINDS = {k.name: k for k in (scheduling_ddim.KIND, scheduling_pndm.KIND, scheduling_dpmsolver.KIND)}
_CLASS_NAMES = {k.class_name: name for name, k in KINDS.items()}
_ALIASES = {**{name: name for name in KINDS}, **{a: name for name, k in KINDS.items() for a in k.aliases}}
NAMES = (*_ALIASES, *_CLASS_NAMES)  # every name `resolve_kind` takes


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
  full = dict(KINDS[k].defaults)
  for key, value in config.items():
    if key in full:
      full[key] = value
  for key, value in overrides.items():
    if key not in full:
      raise SchedulerConfigError(f"scheduler override {key}={value!r}: {k} has no config key {key!r} "
                                 f"(its keys: {sorted(full)})")
    full[key] = value
  for key, allowed in {**COMMON_SUPPORTED, **KINDS[k].supported}.items():
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
  return Scheduler(k, tuple(sorted((key, freeze(v)) for key, v in full.items())))


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
  return KINDS[sched.kind].timesteps(sched, n)


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
  kind = KINDS[sched.kind]
  sigmas = kind.sigmas(sched, ac, ts)
  hist = jnp.zeros((kind.history,) + shape, jnp.float32)
  cur = jnp.zeros(shape if kind.keeps_sample else (), jnp.float32)
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
  alpha, sigma = KINDS[sched.kind].noise_coefficients(a)
  return alpha * x0 + sigma * eps


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
    if KINDS[sched.kind].keeps_sample:
      state = state.replace(cur_sample=jnp.zeros(x.shape, jnp.float32))
  return KINDS[sched.kind].step(sched, state, mo, i, x)

"""Schedulers against diffusers' PyTorch DDIMScheduler / PNDMScheduler / DPMSolverMultistepScheduler."""
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import (
    StableDiffusionInpaintPipeline)

from synood_jax.diffusion import schedulers as S

# stabilityai/stable-diffusion-2-inpainting scheduler/scheduler_config.json
SD2_INPAINT = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "prediction_type": "epsilon",
}
TORCH = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "dpmsolver_multistep": DPMSolverMultistepScheduler}
KINDS = tuple(TORCH)
SHAPE = (2, 8, 8, 4)
_step = jax.jit(S.step, static_argnums=0)


def both(kind, **overrides):
  cfg = dict(SD2_INPAINT, **overrides)
  return TORCH[kind].from_config(cfg), S.make_scheduler(cfg, kind=kind)


def torch_get_timesteps(ref, steps, strength):
  """The real pipeline method (it only touches self.scheduler); sets DPM-Solver's begin_index too."""
  ref.set_timesteps(steps)
  ts, n = StableDiffusionInpaintPipeline.get_timesteps(SimpleNamespace(scheduler=ref), steps, strength, "cpu")
  return ts, n


def fake_model(x, t):
  """Deterministic stand-in for the UNet, the same float32 ops in numpy and jnp."""
  xp = jnp if isinstance(x, jax.Array) else np
  tt = xp.asarray(t, xp.float32) / xp.float32(1000)
  return (xp.float32(0.6) + xp.float32(0.3) * tt) * x - xp.float32(0.05) * x * x + xp.float32(0.1) * tt


def start_latents(ref, sched, ts, strength, seed=0):
  rng = np.random.default_rng(seed)
  x0 = rng.standard_normal(SHAPE).astype(np.float32)
  eps = rng.standard_normal(SHAPE).astype(np.float32)
  if strength == 1.0:
    return eps, eps
  xr = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(ts[:1]).repeat(SHAPE[0]))
  xj = S.add_noise(sched, x0, eps, np.repeat(ts[:1], SHAPE[0]))
  return xr.numpy(), np.asarray(xj)


# ---------------------------------------------------------------------------------------------- config

def test_load_config_from_pipeline_and_scheduler_folder(tmp_path):
  folder = tmp_path / "scheduler"
  folder.mkdir()
  (folder / "scheduler_config.json").write_text(json.dumps(SD2_INPAINT))
  for where in (tmp_path, folder, folder / "scheduler_config.json"):
    sched = S.make_scheduler(S.load_scheduler_config(str(where)))
    assert sched.kind == "pndm" and sched.skip_prk_steps and sched.steps_offset == 1
  assert hash(sched) == hash(S.make_scheduler(dict(SD2_INPAINT)))
  assert sched.order == PNDMScheduler.order == 1
  assert S.init_noise_sigma(sched) == PNDMScheduler.from_config(SD2_INPAINT).init_noise_sigma == 1.0
  x = np.ones(SHAPE, np.float32)
  np.testing.assert_array_equal(S.scale_model_input(sched, x, 5), x)


def test_config_errors_name_the_file_or_key(tmp_path):
  with pytest.raises(S.SchedulerConfigError, match="scheduler_config.json"):
    S.load_scheduler_config(str(tmp_path))
  (tmp_path / "scheduler_config.json").write_text("{not json")
  with pytest.raises(S.SchedulerConfigError, match=str(tmp_path / "scheduler_config.json")):
    S.load_scheduler_config(str(tmp_path))
  bad = [
      ({"beta_schedule": "sigmoid"}, None, "beta_schedule"),
      ({"skip_prk_steps": False}, None, "skip_prk_steps"),
      ({"prediction_type": "sample"}, "ddim", "prediction_type"),
      ({"timestep_spacing": "karras"}, "ddim", "timestep_spacing"),
      ({"thresholding": True}, "ddim", "thresholding"),
      ({"rescale_betas_zero_snr": True}, "ddim", "rescale_betas_zero_snr"),
      ({"algorithm_type": "sde-dpmsolver++"}, "dpmsolver_multistep", "algorithm_type"),
      ({"use_karras_sigmas": True}, "dpmsolver_multistep", "use_karras_sigmas"),
      ({"solver_order": 3}, "dpmsolver_multistep", "solver_order"),
      ({"_class_name": "EulerDiscreteScheduler"}, None, "_class_name"),
  ]
  for overrides, kind, key in bad:
    with pytest.raises(S.SchedulerConfigError, match=key):
      S.make_scheduler(dict(SD2_INPAINT, **overrides), kind=kind)
  cfg = dict(SD2_INPAINT)
  del cfg["_class_name"]
  with pytest.raises(S.SchedulerConfigError, match="_class_name"):
    S.make_scheduler(cfg)


def test_defaults_follow_each_diffusers_class():
  # keys missing from SD2's config take the target class's defaults, as from_config does
  for kind in KINDS:
    ref, sched = both(kind)
    for key, value in sched.config.items():
      assert ref.config[key] == (list(value) if isinstance(value, tuple) else value), (kind, key)
  assert S.make_scheduler(SD2_INPAINT, "dpmsolver_multistep").timestep_spacing == "linspace"
  assert S.make_scheduler({"_class_name": "DDIMScheduler"}).clip_sample is True


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_bit_exact(schedule):
  for kind in KINDS:
    ref, sched = both(kind, beta_schedule=schedule, beta_start=0.0001 if schedule == "linear" else 0.00085)
    np.testing.assert_array_equal(S.alphas_cumprod(sched), ref.alphas_cumprod.numpy())


# ------------------------------------------------------------------------------------------- timesteps

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spacing", [None, "leading", "trailing", "linspace"])
def test_set_timesteps_tables(kind, spacing):
  overrides = {} if spacing is None else {"timestep_spacing": spacing}
  ref, sched = both(kind, **overrides)
  for steps in (1, 7, 10, 20, 25, 50, 999):
    ref.set_timesteps(steps)
    got = S.set_timesteps(sched, steps)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, ref.timesteps.numpy(), err_msg=f"{kind} {spacing} {steps}")


@pytest.mark.parametrize("kind", KINDS)
def test_get_timesteps_matches_inpaint_pipeline(kind):
  ref, sched = both(kind)
  for steps in (20, 10):
    for strength in (1.0, 0.6, 0.75, 0.3, 0.01):
      want, n_want = torch_get_timesteps(ref, steps, strength)
      got, n_got = S.get_timesteps(sched, steps, strength)
      np.testing.assert_array_equal(got, want.numpy())
      assert n_got == n_want
  got, n = S.get_timesteps(sched, 20, 0.6)
  # PNDM's table has 21 entries (one repeated): its strength-0.6 cut is 13 model calls, not 12
  assert (len(got), n) == ((13, 12) if kind == "pndm" else (12, 12))
  assert got[0] == {"pndm": 601, "ddim": 551, "dpmsolver_multistep": 599}[kind]


def test_pndm_full_table_repeats_an_entry():
  ts = S.set_timesteps(S.make_scheduler(SD2_INPAINT), 20)
  assert len(ts) == 21 and ts[1] == ts[2] == 901 and ts[0] == 951 and ts[-1] == 1


# ----------------------------------------------------------------------------------------------- steps

CASES = [
    ("pndm", 1.0, {}), ("pndm", 0.6, {}), ("ddim", 1.0, {}), ("ddim", 0.6, {}),
    ("dpmsolver_multistep", 1.0, {}), ("dpmsolver_multistep", 0.6, {}),
    ("pndm", 0.6, {"prediction_type": "v_prediction"}),
    ("ddim", 1.0, {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("dpmsolver_multistep", 0.6, {"prediction_type": "v_prediction"}),
    ("ddim", 1.0, {"clip_sample": True, "set_alpha_to_one": True, "timestep_spacing": "linspace"}),
    ("pndm", 1.0, {"timestep_spacing": "trailing"}),
    ("pndm", 0.6, {"beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001, "beta_end": 0.02}),
    ("dpmsolver_multistep", 1.0, {"final_sigmas_type": "sigma_min", "solver_type": "heun"}),
    ("dpmsolver_multistep", 0.6, {"timestep_spacing": "leading", "lower_order_final": False}),
]


@pytest.mark.parametrize("kind,strength,overrides", CASES)
def test_step_matches_diffusers(kind, strength, overrides):
  """Teacher-forced (same input to both at every step): each step within 1e-6 (relative to the sample
  scale, at least 1). Free-running (each side feeds itself): the whole trajectory stays within 1e-5."""
  assert_steps_match(lambda: both(kind, **overrides), strength)


def assert_steps_match(make_both, strength):
  """make_both() -> a fresh (diffusers scheduler, ours) pair; see test_step_matches_diffusers."""
  for steps in (20, 10):  # 10 < 15: DPM-Solver's lower_order_final regime
    ref, sched = make_both()
    ts_r, _ = torch_get_timesteps(ref, steps, strength)
    ts, _ = S.get_timesteps(sched, steps, strength)
    xr, xj = start_latents(ref, sched, ts, strength)
    np.testing.assert_allclose(xj, xr, rtol=0, atol=1e-6)
    state = S.init_state(sched, ts, SHAPE, num_inference_steps=steps)
    for i, t in enumerate(ts):
      m = fake_model(xr, t)
      want = ref.step(torch.from_numpy(m), ts_r[i], torch.from_numpy(xr)).prev_sample.numpy()
      got, state = _step(sched, state, m, i, xr)
      assert got.dtype == jnp.float32
      err = np.abs(np.asarray(got) - want).max()
      assert err <= 1e-6 * max(1.0, np.abs(want).max()), (i, t, err)
      xr = want
    assert int(state.counter) == len(ts)

    ref, sched = make_both()
    ts_r, _ = torch_get_timesteps(ref, steps, strength)
    xr, xj = start_latents(ref, sched, ts, strength)
    state = S.init_state(sched, ts, SHAPE)  # num_inference_steps inferred from the cut table
    assert state.num_inference_steps == steps
    xr = torch.from_numpy(xr)
    for i, t in enumerate(ts):
      xr = ref.step(torch.from_numpy(fake_model(xr.numpy(), t)), ts_r[i], xr).prev_sample
      xj, state = _step(sched, state, fake_model(np.asarray(xj), t), i, xj)
      np.testing.assert_allclose(np.asarray(xj), xr.numpy(), rtol=0, atol=1e-5)


# What a DDIMScheduler built on its own saves (from_config of another class would keep that class's keys).
DDIM_SAVED = json.loads(DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                      timestep_spacing="trailing").to_json_string())


def test_overrides_as_from_config_kwargs():
  """PNDM on a config saved by DDIMScheduler: refused with the override that fixes it; with the
  override, the same config, timesteps and steps as PNDMScheduler.from_config(cfg, skip_prk_steps=True)."""
  ddim_cfg = dict(DDIM_SAVED)
  assert "skip_prk_steps" not in ddim_cfg
  with pytest.raises(S.SchedulerConfigError, match="skip_prk_steps") as err:
    S.make_scheduler(ddim_cfg, "pndm")
  assert "make_scheduler(config, 'pndm', skip_prk_steps=True)" in str(err.value)
  assert "scheduler_overrides={'skip_prk_steps': True}" in str(err.value)
  with pytest.raises(S.SchedulerConfigError, match="no config key 'skip_prk'"):
    S.make_scheduler(ddim_cfg, "pndm", skip_prk=True)
  with pytest.raises(S.SchedulerConfigError, match="timestep_spacing.*the override"):
    S.make_scheduler(ddim_cfg, "pndm", skip_prk_steps=True, timestep_spacing="karras")

  overrides = dict(skip_prk_steps=True, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
  ref = PNDMScheduler.from_config(ddim_cfg, **overrides)
  sched = S.make_scheduler(ddim_cfg, "pndm", **overrides)
  for key, value in sched.config.items():
    assert ref.config[key] == (list(value) if isinstance(value, tuple) else value), key
  for steps in (20, 7):
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(S.set_timesteps(sched, steps), ref.timesteps.numpy())
  assert_steps_match(lambda: (PNDMScheduler.from_config(ddim_cfg, **overrides),
                              S.make_scheduler(ddim_cfg, "pndm", **overrides)), 0.6)


def test_inpaint_pipeline_scheduler_fixes_outdated_fields():
  """StableDiffusionInpaintPipeline.__init__ sets steps_offset=1 and PNDM's skip_prk_steps=True."""
  cfg = dict(DDIM_SAVED, steps_offset=0)
  pndm = S.inpaint_pipeline_scheduler(cfg, "pndm")
  assert pndm.skip_prk_steps is True and pndm.steps_offset == 1
  assert pndm == S.make_scheduler(cfg, "pndm", skip_prk_steps=True, steps_offset=1)
  assert S.inpaint_pipeline_scheduler(cfg).steps_offset == 1
  assert S.inpaint_pipeline_scheduler(cfg, "pndm", steps_offset=0).steps_offset == 0  # overrides win


@pytest.mark.parametrize("kind", KINDS)
def test_add_noise_matches_diffusers(kind):
  ref, sched = both(kind)
  rng = np.random.default_rng(1)
  x0 = rng.standard_normal(SHAPE).astype(np.float32)
  eps = rng.standard_normal(SHAPE).astype(np.float32)
  for strength in (0.6, 1.0, 0.3):
    ts_r, _ = torch_get_timesteps(ref, 20, strength)  # sets DPM-Solver's begin_index like the pipeline
    ts, _ = S.get_timesteps(sched, 20, strength)
    t_batch = torch.from_numpy(ts[:1]).repeat(SHAPE[0])
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), t_batch).numpy()
    np.testing.assert_allclose(np.asarray(S.add_noise(sched, x0, eps, t_batch.numpy())), want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.jit(S.add_noise, static_argnums=0)(sched, x0, eps, ts[0])),
                               want, rtol=0, atol=1e-6)
  if kind != "dpmsolver_multistep":  # per-sample timesteps (DPM-Solver's goes through its begin_index)
    t = np.array([999, 3])
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(np.asarray(S.add_noise(sched, x0, eps, t)), want, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ jit / loops

@pytest.mark.parametrize("kind,strength", [("pndm", 1.0), ("pndm", 0.6), ("ddim", 0.6),
                                           ("dpmsolver_multistep", 0.6)])
def test_fori_loop_equals_eager_loop(kind, strength):
  sched = S.make_scheduler(SD2_INPAINT, kind)
  ts, _ = S.get_timesteps(sched, 20, strength)
  x = jnp.asarray(np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32))

  @jax.jit
  def run(x, state):
    def body(i, carry):
      x, state = carry
      t = state.timesteps[i]
      return S.step(sched, state, fake_model(S.scale_model_input(sched, x, t), t), i, x)
    return jax.lax.fori_loop(0, state.timesteps.shape[0], body, (x, state))

  looped, end_state = run(x, S.init_state(sched, ts, SHAPE, num_inference_steps=20))
  eager_x = x
  state = S.init_state(sched, ts)  # no sample_shape: buffers are sized on the first (eager) step
  for i, t in enumerate(ts):
    eager_x, state = S.step(sched, state, fake_model(eager_x, jnp.int32(t)), i, eager_x)
  # Not bit-equal: XLA fuses the model and the step inside the loop (FMA contraction), so the two differ
  # by float32 rounding, accumulated over the steps.
  scale = max(1.0, float(jnp.abs(eager_x).max()))
  np.testing.assert_allclose(np.asarray(looped), np.asarray(eager_x), rtol=0, atol=1e-6 * scale)
  assert int(end_state.counter) == int(state.counter) == len(ts)
  np.testing.assert_allclose(np.asarray(end_state.history), np.asarray(state.history), rtol=0, atol=1e-6 * scale)


def test_step_rejects_mismatched_shapes():
  sched = S.make_scheduler(SD2_INPAINT)
  ts, _ = S.get_timesteps(sched, 20, 0.6)
  state = S.init_state(sched, ts, SHAPE)
  with pytest.raises(ValueError, match="sample shape"):
    S.step(sched, state, np.zeros((1, 8, 8, 4), np.float32), 0, np.zeros((1, 8, 8, 4), np.float32))
  with pytest.raises(S.SchedulerConfigError, match="num_inference_steps"):
    S.init_state(sched, np.array([7, 5, 3]))


@pytest.mark.parametrize("kind", KINDS)
def test_full_table_with_skipped_prefix_equals_cut_table(kind):
  """init_state on the whole set_timesteps table and step only from the strength cut on (begin_index),
  as a sampler with a traced strength does, equals running the cut table."""
  sched = S.make_scheduler(SD2_INPAINT, kind)
  full = S.set_timesteps(sched, 20)
  cut, _ = S.get_timesteps(sched, 20, 0.6)
  first = len(full) - len(cut)
  x0 = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)

  @jax.jit
  def run_full(x, first):
    def body(i, carry):
      x, state = carry
      go = lambda: S.step(sched, state, fake_model(x, state.timesteps[i]), i, x)
      return jax.lax.cond(i >= first, go, lambda: (x, state))
    return jax.lax.fori_loop(0, len(full), body, (x, S.init_state(sched, full, SHAPE, 20)))[0]

  x, state = jnp.asarray(x0), S.init_state(sched, cut, SHAPE, 20)
  for i, t in enumerate(cut):
    x, state = _step(sched, state, fake_model(x, jnp.int32(t)), i, x)
  scale = max(1.0, float(jnp.abs(x).max()))
  np.testing.assert_allclose(np.asarray(run_full(jnp.asarray(x0), first)), np.asarray(x), rtol=0,
                             atol=1e-6 * scale)

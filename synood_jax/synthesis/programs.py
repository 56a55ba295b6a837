"""The per-batch synthesis programs: source latents and noise from (seed, source id), the text states, and
the K refinement iterations of `refinement.py` over the in-painting sampler, the VAE decoder and the
guidance classifier.

z_in = scaling_factor * sample(E(x)),  x_syn = D(z0 / scaling_factor),
z0 = Sampler(add_noise(z_in, eps_K, t0), "A photo only remain {context}.")
"""
from __future__ import annotations

import functools
import time
from concurrent import futures
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from synood_jax import parallel
from synood_jax.diffusion import inpaint, schedulers
from synood_jax.models import vae as vae_lib
from synood_jax.synthesis import refinement


def draw_inputs(pipe, vae_params, images: jax.Array, ids: jax.Array, seed: jax.Array):
  """(z_in, eps): each image's posterior sample of its source, scaled, and its noise, both from
  (seed, source id)."""
  key = jax.random.key(seed)
  keys = jax.vmap(lambda i: (jax.random.fold_in(jax.random.fold_in(key, 0), i),
                             jax.random.fold_in(jax.random.fold_in(key, 1), i)))
  k_src, k_eps = keys(ids)
  mean, logvar = pipe.vae_encode(vae_params, images)
  mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
  z_in = jax.vmap(vae_lib.vae_sample)(mean, logvar, k_src) * pipe.scaling_factor
  eps = jax.vmap(lambda k: jax.random.normal(k, z_in.shape[1:], jnp.float32))(k_eps)
  return z_in, eps


def text_context(pipe, text_params, prompt_ids: jax.Array, negative_ids: jax.Array):
  """(cond, uncond) text-encoder states [B, L, D]: each prompt's and the empty negative prompt's."""
  cond = pipe.text_hidden(text_params, prompt_ids)
  return cond, jnp.broadcast_to(pipe.text_hidden(text_params, negative_ids), cond.shape)


def refine_models(pipe, refine_cfg: refinement.RefineConfig, steps: int, logits_fn: Callable,
                  z_in: jax.Array, cond: jax.Array, uncond: jax.Array, masked_latents: jax.Array,
                  first_index: jax.Array, guidance_scale: jax.Array, table=None) -> refinement.Models:
  """The in-painting pipeline and classifier as `refinement.Models` for one batch (its source latents
  z_in and text states): add_noise at the strength cut t0, the sampler from there (full-image mask,
  the all-zero image's latents), u = z0 / scaling_factor, the VAE decoder, the classifier. `table`:
  the scheduler's timestep table for `steps` (computed here if not given)."""
  table = inpaint.timestep_table(pipe.scheduler, steps) if table is None else table
  mask = jnp.ones(z_in.shape[:-1] + (1,), jnp.float32)
  masked = jnp.broadcast_to(masked_latents, z_in.shape)
  t0 = jnp.asarray(table)[first_index]
  vae_cfg = pipe.vae.cfg
  return refinement.Models(
      noise=lambda e: schedulers.add_noise(pipe.scheduler, z_in, e, jnp.full((e.shape[0],), t0)),
      sample=lambda p, z_t: inpaint.sample_latents(pipe.unet, pipe.scheduler, p["unet"], z_t, cond, uncond, mask,
                                                   masked, guidance_scale, steps, first_index, image_latents=z_in,
                                                   noise=z_t, remat=refine_cfg.grad_mode == "exact", table=table),
      input=lambda z0: inpaint.decoder_input(z0, pipe.scaling_factor, vae_cfg.latents_mean, vae_cfg.latents_std),
      decode=lambda p, u: inpaint.decode_unscaled(pipe.vae_decode, p["vae"], u, refine_cfg.decode_chunk),
      logits=lambda p, x: logits_fn(p["classifier"], x))


def refine_batch(pipe, refine_cfg: refinement.RefineConfig, steps: int, logits_fn: Callable, params: dict,
                 z_in: jax.Array, eps: jax.Array, prompt_ids: jax.Array, negative_ids: jax.Array,
                 masked_latents: jax.Array, first_index: jax.Array, guidance_scale: jax.Array,
                 hyper: refinement.Hyper):
  """All K refinement iterations from given source latents z_in and noise eps, as one traceable function
  (`refinement.refine`)."""
  cond, uncond = text_context(pipe, params["text"], prompt_ids, negative_ids)
  models = refine_models(pipe, refine_cfg, steps, logits_fn, z_in, cond, uncond,
                         masked_latents, first_index, guidance_scale)
  return refinement.refine(refine_cfg, hyper, models, params, eps)


def synthesize_batch(pipe, refine_cfg: refinement.RefineConfig, steps: int, logits_fn: Callable, params: dict,
                     images: jax.Array, ids: jax.Array, prompt_ids: jax.Array, negative_ids: jax.Array, masked_latents: jax.Array,
                     first_index: jax.Array, guidance_scale: jax.Array, hyper: refinement.Hyper,
                     seed: jax.Array):
  """All K refinement iterations for one batch as one traceable function; `BatchProgram` runs the same
  computation as separate programs. params: {'unet','vae','text','classifier'}.

  `steps` (the scheduler table length) and `refine_cfg` are static; the strength cut `first_index`,
  the guidance scale and the refinement scalars `hyper` (r, m, reference batch) are traced. Each
  image's posterior sample and noise come from (seed, its source id).
  """
  z_in, eps = draw_inputs(pipe, params["vae"], images, ids, seed)
  return refine_batch(pipe, refine_cfg, steps, logits_fn, params, z_in, eps, prompt_ids,
                      negative_ids, masked_latents, first_index, guidance_scale, hyper)


class BatchProgram:
  """`synthesize_batch` as four jitted programs on a host loop: start (source latents, noise, text
  states), sample (K times), update (K - 1 times) and outcome (decode, classify, stack the scores).

  Why not one program: the unrolled K-loop repeats the sampler and the gradient in one executable, which
  took 11-12 s to trace, lower and load from the compile cache before the first batch on CPU (small
  preset); the pieces compile each computation once, and run as fast (README, "Synthesis speed").
  Dispatch is asynchronous, so the host loop does not wait for the device between pieces, and on a
  first call each piece is traced and compiled while the device runs the one before.

  Each program has explicit shardings: params as `param_shardings` (`parallel.shardings_of` the placed
  params: the program takes them as they lie, by whatever rules placed them), batch rows split over every device,
  scalars replicated, scores and losses [K, B] split on B; eps is donated to the update that replaces it.
  Call it with `synthesize_batch`'s arguments (after params); it returns (images, scores [K, B],
  losses [K, B], eps, steps_finite [B]). `compile` compiles every piece ahead instead.
  """

  def __init__(self, pipe, refine_cfg: refinement.RefineConfig, steps: int, logits_fn: Callable, mesh,
               param_shardings):
    self.cfg, self.mesh = refine_cfg, mesh
    table = inpaint.timestep_table(pipe.scheduler, steps)  # once for every program and trace
    rep = parallel.replicated(mesh)
    rows = lambda ndim: parallel.batch_sharding(mesh, ndim)
    batch = (rows(4), rows(3), rows(3))   # z_in, cond, uncond
    consts = (rep, rep, rep)              # masked latents, first index, guidance scale
    step = (rows(1), rows(1), rows(1))    # ok, loss, s of one update

    def models(b, c):
      return refine_models(pipe, refine_cfg, steps, logits_fn, *b, *c, table=table)

    def start(params, images, ids, prompt_ids, negative_ids, seed):
      z_in, eps = draw_inputs(pipe, params["vae"], images, ids, seed)
      return (z_in, *text_context(pipe, params["text"], prompt_ids, negative_ids)), eps

    def sample(params, b, c, eps):
      return refinement.sample(models(b, c), params, eps)

    def update(params, b, c, hyper, eps, z0):
      return refinement.update(refine_cfg, hyper, models(b, c), params, eps, z0)

    def outcome(params, b, c, hyper, z0, history):
      return refinement.outcome(refine_cfg, hyper, models(b, c), params, z0, history)

    self.start = jax.jit(start, in_shardings=(param_shardings, rows(4), rows(1), rows(2), rep, rep),
                         out_shardings=(batch, rows(4)))
    self.sample = jax.jit(sample, in_shardings=(param_shardings, batch, consts, rows(4)), out_shardings=rows(4))
    z0_sharding = rows(4) if refine_cfg.grad_mode == "skip" else None
    self.update = jax.jit(update, in_shardings=(param_shardings, batch, consts, rep, rows(4), z0_sharding),
                          out_shardings=(rows(4), *step), donate_argnums=(4,))
    per_iteration = NamedSharding(mesh, P(None, parallel.BATCH_AXES))
    self.outcome = jax.jit(outcome, in_shardings=(param_shardings, batch, consts, rep, rows(4),
                                                  (step,) * (refine_cfg.iterations - 1)),
                           out_shardings=(rows(4), per_iteration, per_iteration, rows(1)))

  def __call__(self, params, images, ids, prompt_ids, negative_ids, masked_latents, first_index,
               guidance_scale, hyper, seed):
    with jax.set_mesh(self.mesh):  # traced under the mesh: fused attention kernels run per device
      b, eps = self.start(params, images, ids, prompt_ids, negative_ids, seed)
      c = (masked_latents, first_index, guidance_scale)
      return refinement.run(self.cfg, lambda e: self.sample(params, b, c, e),
                            lambda e, z0: self.update(params, b, c, hyper, e, z0),
                            lambda z0, history: self.outcome(params, b, c, hyper, z0, history), eps)

  def compile(self, params, images, ids, prompt_ids, negative_ids, masked_latents, first_index,
              guidance_scale, hyper, seed, only: Sequence[str] | None = None) -> "BatchProgram":
    """Compile every program (or those named in `only`) ahead for these arguments' shapes, which may be
    abstract (jax.ShapeDtypeStruct): the lowering on this thread, XLA's compiles or cache loads on one
    thread each, in parallel. Returns self, now holding the executables, with the seconds each part took
    in `compile_seconds` ({'lower_s', 'xla_s'})."""
    t0 = time.perf_counter()
    with jax.set_mesh(self.mesh):
      start_args = (params, images, ids, prompt_ids, negative_ids, seed)
      b, eps = jax.eval_shape(self.start, *start_args)
      c = (masked_latents, first_index, guidance_scale)
      update_args = (params, b, c, hyper, eps, eps if self.cfg.grad_mode == "skip" else None)  # z0 is eps-shaped
      step = jax.eval_shape(self.update, *update_args)[1:]
      lowered = {"start": self.start.lower(*start_args),
                 "sample": self.sample.lower(params, b, c, eps),
                 "outcome": self.outcome.lower(params, b, c, hyper, eps, (step,) * (self.cfg.iterations - 1))}
      if self.cfg.iterations > 1:
        lowered["update"] = self.update.lower(*update_args)
      lowered = {name: low for name, low in lowered.items() if only is None or name in only}
    t1 = time.perf_counter()
    with futures.ThreadPoolExecutor(len(lowered), "synthesis-compile") as pool:
      done = {name: pool.submit(low.compile) for name, low in lowered.items()}
      for name, fut in done.items():
        setattr(self, name, fut.result())
    self.compile_seconds = {"lower_s": t1 - t0, "xla_s": time.perf_counter() - t1}
    return self


def masked_image_latents(pipe, vae_params, size: int) -> jax.Array:
  """Latents of the all-zero masked image (the mask covers everything): the posterior mean, scaled.

  The official pipeline samples this posterior on every call; the mean is its deterministic choice.
  """
  return _masked_image_latents(pipe.vae, pipe.scaling_factor, size, vae_params)


# Jitted (op by op, the VAE encoder took seconds of a cold start); static on the VAE module and numbers
# only, so the jit cache holds no pipeline or params.
@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _masked_image_latents(vae_module, scaling_factor: float, size: int, vae_params):
  zeros = jnp.zeros((1, size, size, 3), jnp.float32)
  mean, _ = vae_module.apply({"params": vae_params}, zeros, method=vae_module.encode)
  return mean.astype(jnp.float32) * scaling_factor

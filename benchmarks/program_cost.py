"""What one synthesis batch costs, without running it: FLOPs from the lowered programs and each compiled
program's memory. No weights are needed: the pipeline is built from its configs with abstract params
(jax.ShapeDtypeStruct), so SD-2 in-painting's full size lowers on a laptop.

FLOPs come from the *lowered* module (StableHLO before XLA optimises it): a compiled GPU module counts cuDNN
and cuBLAS custom calls as zero, which made an earlier script report 2% of peak. Attention is lowered on the
plain XLA path here, so a fused kernel's work is counted as the math it does. XLA counts a loop body once,
so each piece is lowered on its own and multiplied by how often a batch runs it:
  UNet call (guided: 2B rows) x kept steps x K, decoder+classifier gradient x (K - 1),
  final decode + classifier x 1, VAE encode of the sources + the two text encodings x 1.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from synood_jax.diffusion import inpaint, inpaint_pipeline, schedulers
from synood_jax.models import checkpoint_io, clip, clip_config, clip_modules, resnet, unet as unet_lib, vae as vae_lib
from synood_jax.synthesis import guidance, programs, refinement

GIB = 2.0**30


def abstract_pipeline(unet_cfg: dict, vae_cfg: dict, text_cfg: dict, scheduler_cfg: dict, dtype, attention="xla"):
  """(InpaintPipeline, abstract params incl. a ResNet-50 classifier's, logits_fn) from config dicts."""
  unet = unet_lib.build(unet_cfg, dtype, attention=attention)
  vae = vae_lib.build(vae_cfg, dtype, attention=attention)
  text_config = clip_config.config_from_hf({"model_type": "clip_text_model", **text_cfg}, projection=False)
  text_module = clip_modules.CLIP(text_config, dtype=dtype, param_dtype=dtype, attention=attention)
  pipe = inpaint_pipeline.InpaintPipeline(
      unet=unet, vae=vae, text=clip.CLIPBundle(text_config, text_module, None), scaling_factor=vae.scaling_factor,
      scheduler=schedulers.inpaint_pipeline_scheduler(scheduler_cfg), folder="", sample_size=64)
  classifier = resnet.ResNet(dtype=dtype)
  logits_fn, classifier_params = guidance.resnet50(
      classifier, jax.eval_shape(classifier.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))["params"])
  params = {"unet": unet_lib.param_shapes(unet), "vae": vae_lib.param_shapes(vae),
            "text": clip.abstract_params(text_module), "classifier": classifier_params}
  return pipe, params, logits_fn


def folder_configs(folder: str) -> tuple[dict, dict, dict, dict]:
  """(unet, vae, text encoder, scheduler) configs of a diffusers in-painting folder."""
  unet_cfg, vae_cfg, text_cfg = (checkpoint_io.read_config(os.path.join(folder, sub))
                                 for sub in ("unet", "vae", "text_encoder"))
  return unet_cfg, vae_cfg, text_cfg, schedulers.load_scheduler_config(os.path.join(folder, "scheduler"))


def batch_shapes(pipe, batch: int, image: int, text_len: int = 77):
  """Abstract inputs of one batch: (images, ids, prompt ids, negative ids, masked latents, z_in)."""
  f = pipe.vae_scale_factor
  s = jax.ShapeDtypeStruct
  latent = (batch, image // f, image // f, pipe.unet.cfg.out_channels)
  return (s((batch, image, image, 3), jnp.float32), s((batch,), jnp.int32), s((batch, text_len), jnp.int32),
          s((1, text_len), jnp.int32), s((1,) + latent[1:], jnp.float32), s(latent, jnp.float32))


def _lowered_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def flops_per_batch(pipe, params, logits_fn, batch: int, image: int, steps: int, strength: float,
                    iterations: int) -> dict:
  """Lowered FLOPs of one synthesis batch, piece by piece (see the module docstring), and per image."""
  images, ids, prompt_ids, negative_ids, masked, z = batch_shapes(pipe, batch, image)
  kept = len(schedulers.get_timesteps(pipe.scheduler, steps, strength)[0])
  cfg, hyper = refinement.RefineConfig(iterations=iterations), refinement.Hyper.make()
  text_len = prompt_ids.shape[1]
  width = pipe.text.config.text.hidden_size
  context = jax.ShapeDtypeStruct((2 * batch, text_len, width), jnp.float32)
  extra = jax.ShapeDtypeStruct(z.shape[:-1] + (pipe.unet.cfg.in_channels - z.shape[-1],), jnp.float32)
  decode = lambda p, u: inpaint.decode_unscaled(pipe.vae_decode, p["vae"], u)
  logits = lambda p, x: logits_fn(p["classifier"], x)

  def unet_call(p, x, ctx, ex):
    return inpaint._guided_noise(pipe.unet, p, x, 500, ctx, ex, 8.0)  # pylint: disable=protected-access

  def encoders(p, images, ids, prompt_ids, negative_ids):
    z_in, _ = programs.draw_inputs(pipe, p["vae"], images, ids, np.uint32(0))
    return z_in, programs.text_context(pipe, p["text"], prompt_ids, negative_ids)

  pieces = {
      "unet": _lowered_flops(unet_call, params["unet"], z, context, extra),
      "gradient": _lowered_flops(functools.partial(refinement.skip_gradient, cfg, hyper, decode, logits), params, z),
      "final": _lowered_flops(lambda p, u: logits(p, decode(p, u)), params, z),
      "encoders": _lowered_flops(encoders, params, images, ids, prompt_ids, negative_ids),
  }
  counts = {"unet": kept * iterations, "gradient": iterations - 1, "final": 1, "encoders": 1}
  total = sum(pieces[k] * counts[k] for k in pieces)
  return dict(pieces=pieces, counts=counts, total=total, per_image=total / batch)


def flops_lines(f: dict, batch: int) -> list[str]:
  per = {k: f["pieces"][k] * f["counts"][k] / batch / 1e12 for k in f["pieces"]}
  return [f"  lowered FLOPs per image: UNet {per['unet']:.2f} ({f['counts']['unet']} guided calls, "
          f"{f['pieces']['unet'] / (2 * batch) / 1e12:.3f} TFLOP per row per forward), decoder gradients "
          f"{per['gradient']:.2f} ({f['counts']['gradient']} x {f['pieces']['gradient'] / batch / 1e12:.2f}), "
          f"final decode + classifier {per['final']:.2f}, encoders {per['encoders']:.2f}",
          f"TFLOP per image: {f['per_image'] / 1e12:.2f}"]


def memory_lines(program: "programs.BatchProgram") -> list[str]:
  """compiled.memory_analysis() of each compiled piece of a BatchProgram (after `.compile(...)`)."""
  out = []
  for name in ("start", "sample", "update", "outcome"):
    compiled = getattr(program, name)
    analysis = getattr(compiled, "memory_analysis", lambda: None)()
    if analysis is None:
      out.append(f"  memory {name:8s} (not compiled)")
      continue
    args, outs, temps = (getattr(analysis, f"{k}_size_in_bytes", 0) / GIB for k in ("argument", "output", "temp"))
    alias = getattr(analysis, "alias_size_in_bytes", 0) / GIB
    out.append(f"  memory {name:8s} arguments {args:7.2f} GiB, outputs {outs:6.2f} GiB, temporaries {temps:7.2f} GiB"
               f" -> peak about {args + outs - alias + temps:7.2f} GiB")
  return out


def compiled_memory(pipe, params, logits_fn, batch: int, image: int, steps: int, iterations: int,
                    decode_chunk: int, only=("update",)) -> list[str]:
  """Compile (not run) BatchProgram's pieces named in `only` for abstract inputs on one device of this
  backend; their memory_analysis() lines."""
  from synood_jax import parallel  # pylint: disable=import-outside-toplevel
  images, ids, prompt_ids, negative_ids, masked, _ = batch_shapes(pipe, batch, image)
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  cfg = refinement.RefineConfig(iterations=iterations, decode_chunk=decode_chunk)
  program = programs.BatchProgram(pipe, cfg, steps, logits_fn, mesh, parallel.param_shardings(params, mesh))
  scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)
  hyper = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                                 refinement.Hyper.make())
  program.compile(params, images, ids, prompt_ids, negative_ids, masked, scalar(jnp.int32), scalar(jnp.float32),
                  hyper, scalar(jnp.uint32), only=only)
  return memory_lines(program)

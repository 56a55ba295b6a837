"""SynOOD stage-1 synthesis: our per-batch program vs the official PyTorch procedure, same run, same models.

Reference: `official_synthesis.Official`, the official `generate_near_ood_sample.py` loop in PyTorch on
diffusers' StableDiffusionInpaintPipeline (that file says what each iteration does). torch runs with
OMP_WAIT_POLICY=PASSIVE: with the default (spinning) policy its threads burn CPU while waiting, and under
load from other processes its UNet call ran about 5x slower, which would flatter ours.
Ours: `programs.BatchProgram` (four jitted programs with explicit shardings on a host loop, compiled
ahead) called as `synthesize.synthesize` calls it: host tokenization per batch, the masked-image latents computed once,
outputs fetched to the host; without the image/manifest writing (neither side's file IO is timed).

Warm: each side's first call, then --repeats warm calls interleaved (torch, ours, torch, ours, ...). Beside
each timing: the 1-minute load average (which counts this benchmark's own threads) and the cores other
processes kept busy during it (machine CPU time from /proc/stat minus ours); a warning when that passes
common.OTHER_CPU_LIMIT, since the CPU was then shared.
Cold (--cold): a fresh process per side that imports, loads the model folders, runs one batch and exits,
timed from outside; ours twice, first with an empty persistent compile cache, then with it warm. The
official side runs official_synthesis.py, which imports no JAX.

  python benchmarks/synthesis_vs_reference.py --preset=tiny --cold      # 64 px
  python benchmarks/synthesis_vs_reference.py --preset=small --cold     # 256 px, 32x32 latents
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch's OpenMP starts: before any import of it
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (also puts the repository root on sys.path)
from common import FLAGS  # noqa: E402
from official_synthesis import Official, build  # noqa: E402  (PyTorch only)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from synood_jax import parallel  # noqa: E402
from synood_jax.diffusion import inpaint, pipeline, schedulers  # noqa: E402
from synood_jax.models import resnet  # noqa: E402
from synood_jax.synthesis import guidance, programs, refinement, synthesize as synthesis  # noqa: E402

flags.DEFINE_bool("cold", False, "also time a cold process per side (imports, loading, compile, one batch)")
flags.DEFINE_bool("cold_child", False, "internal: run one batch of ours in this process")
flags.DEFINE_string("cache_dir", "", "internal: the compile cache of a cold run")


def batch_inputs(batch: int, image: int):
  """Source images NHWC in [-1, 1], the official prompt form, and stable source ids."""
  sources, prompts = common.synthesis_inputs(batch, image)
  ids = np.array([synthesis.source_id(f"c/{i}.JPEG") for i in range(batch)], np.int32)
  return sources, prompts, ids


class Ours:
  """Our per-batch program as `synthesize` builds and calls it."""

  def __init__(self, folder: str, resnet_path: str, dtype=jnp.float32, iterations: int = 3,
               hyper: refinement.Hyper | None = None, attention: str = "auto", decode_chunk: int = 0):
    self.pipe, params = pipeline.load_inpaint_pipeline(folder, dtype=dtype, attention=attention)
    module, rparams = resnet.load(resnet_path, dtype=dtype)
    self.logits_fn, params["classifier"] = guidance.resnet50(module, rparams)
    self.mesh = parallel.make_mesh(devices=jax.devices()[:1])
    self.params = parallel.place_params(params, self.mesh)
    shardings = parallel.shardings_of(self.params)
    self.cfg = refinement.RefineConfig(iterations=iterations, decode_chunk=decode_chunk)
    self.program = programs.BatchProgram(self.pipe, self.cfg, FLAGS.steps, self.logits_fn, self.mesh, shardings)
    self.image = None
    self.hyper = hyper or refinement.Hyper.make(FLAGS.step_size, FLAGS.target, FLAGS.batch)

  def args(self, sources, prompts, ids, seed: int = 0):
    pipe, image = self.pipe, sources.shape[1]
    if self.image != image:
      self.masked = programs.masked_image_latents(pipe, self.params["vae"], image)
      self.negative_ids = jnp.asarray(pipe.tokenize([""]))
      self.image = image
    prompt_ids = np.asarray(pipe.tokenize(prompts))
    return (self.params, *parallel.global_batch((sources, ids, prompt_ids), self.mesh), self.negative_ids,
            self.masked, np.int32(inpaint.start_index(pipe.scheduler, FLAGS.steps, FLAGS.strength)),
            np.float32(FLAGS.guidance), self.hyper, np.uint32(seed))

  def compile(self, sources, prompts, ids) -> dict:
    """Compile every program ahead (`BatchProgram.compile`); returns the seconds of each part: building
    the arguments (masked-image latents, tokens), tracing and lowering, and compiling (or loading from
    the cache)."""
    t0 = time.perf_counter()
    args = self.args(sources, prompts, ids)
    t1 = time.perf_counter()
    self.program = self.program.compile(*args)
    return dict(self.program.compile_seconds, args_s=t1 - t0, total_s=time.perf_counter() - t0)

  def run(self, sources, prompts, ids, seed: int = 0):
    out, scores, losses, _, _ = self.program(*self.args(sources, prompts, ids, seed))
    return parallel.to_host((out, scores, losses))


def cold_child() -> None:
  """One batch of ours in a fresh process, as `synthesize` runs its first batch (each program traced and
  compiled as the host loop reaches it); prints its own breakdown as JSON."""
  start = time.perf_counter()
  jax.config.update("jax_compilation_cache_dir", FLAGS.cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  sources, prompts, ids = batch_inputs(FLAGS.batch, common.image_size())
  side = Ours(FLAGS.folder, FLAGS.resnet, iterations=FLAGS.iterations)
  loaded = time.perf_counter()
  args = side.args(sources, prompts, ids)
  ready = time.perf_counter()
  jax.block_until_ready(side.program(*args))
  print(json.dumps({"load_s": loaded - start, "args_s": ready - loaded, "run_s": time.perf_counter() - ready}))


def cold_runs(folder: str, resnet_path: str) -> list[tuple[str, float, dict, tuple[float, float]]]:
  """torch, ours (empty compile cache), torch, ours (warm cache): (name, wall s, breakdown, (load, other))."""
  cache = tempfile.mkdtemp(prefix="synthesis_cold_cache_")
  args = [f"--folder={folder}", f"--resnet={resnet_path}", f"--batch={FLAGS.batch}",
          f"--iterations={FLAGS.iterations}", f"--steps={FLAGS.steps}", f"--strength={FLAGS.strength}",
          f"--guidance={FLAGS.guidance}", f"--step_size={FLAGS.step_size}", f"--target={FLAGS.target}",
          f"--latent_size={FLAGS.latent_size}", f"--vae_channels={','.join(FLAGS.vae_channels)}"]
  here = os.path.dirname(os.path.abspath(__file__))
  official = [os.path.join(here, "official_synthesis.py")]
  ours = [os.path.abspath(__file__), "--cold_child", f"--cache_dir={cache}"]
  out = []
  for name, script in (("official (torch)", official), ("ours, empty compile cache", ours),
                       ("official (torch)", official), ("ours, warm compile cache", ours)):
    with common.OtherCpu() as other:
      start = time.perf_counter()
      res = subprocess.run([sys.executable, *script, *args], check=True, capture_output=True, text=True,
                           env=dict(os.environ, JAX_PLATFORMS="cpu"))
      wall = time.perf_counter() - start
    out.append((name, wall, json.loads(res.stdout.strip().splitlines()[-1]), (common.load_average(), other.cores)))
  return out


def main(argv):
  del argv
  common.apply_preset()
  if FLAGS.cold_child:
    return cold_child()
  tmp = tempfile.mkdtemp(prefix="synthesis_bench_")
  folder, image, resnet_path = build(tmp)
  B = FLAGS.batch
  sources, prompts, ids = batch_inputs(B, image)
  ours = Ours(folder, resnet_path, iterations=FLAGS.iterations)
  official = Official(folder, resnet_path)
  res = common.first_and_warm({"official (torch)": (lambda: official.run(sources, prompts), None),
                               "ours": (lambda: ours.run(sources, prompts, ids), None)}, FLAGS.repeats)
  t_out, t_first, t_warm, t_all, t_loads = res["official (torch)"]
  (o_img, o_scores, _), o_first, o_warm, o_all, o_loads = res["ours"]

  kept = len(schedulers.get_timesteps(ours.pipe.scheduler, FLAGS.steps, FLAGS.strength)[0])
  print(f"synthesis_vs_reference ({FLAGS.preset or 'flags'}): {common.config_line(image)}; "
        "ResNet-50 guidance (resize 232, crop 224)")
  print(f"  batch {B}, K={FLAGS.iterations}, {FLAGS.steps} steps x strength {FLAGS.strength} ({kept} sampler "
        f"steps per iteration), guidance {FLAGS.guidance}, r={FLAGS.step_size}, m={FLAGS.target}, "
        f"reference batch {B}; fp32")
  print("\n".join(common.device_lines()) + f"; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
  print("  (beside each time: the 1-minute load average, which counts this benchmark's own threads, and the "
        "cores other processes used during it)")
  print(f"  {'warm':26s} {'first call s':>19s} {'median s':>9s} {'images/s':>9s}   warm runs s (load / other)")
  for name, first_s, warm_s, all_s, loads in (("official (torch)", t_first, t_warm, t_all, t_loads),
                                               ("ours", o_first, o_warm, o_all, o_loads)):
    runs = " ".join(f"{t:.2f} ({l:.1f} / {o:.2f})" for t, (l, o) in zip(all_s, loads["warm"]))
    first_load, first_other = loads["first"]
    print(f"  {name:26s} {first_s:7.2f} ({first_load:.1f} / {first_other:.2f}) {warm_s:9.2f} {B / warm_s:9.3f}   "
          f"{runs}")
  print(f"  our compile time (first call - warm median): {o_first - o_warm:.1f} s")
  print(f"  ours / official, warm (images/s):          {t_warm / o_warm:.2f}x")
  print(f"  ours / official, first call incl. compile: {t_first / o_first:.2f}x")
  loads = [t_loads["first"], o_loads["first"], *t_loads["warm"], *o_loads["warm"]]
  if FLAGS.cold:
    cold = cold_runs(folder, resnet_path)
    print(f"  {'cold process (one batch)':26s} {'wall s':>9s} {'load+import s':>14s} {'arguments s':>12s} "
          f"{'first batch s':>14s}  load / other")
    for name, wall, parts, (load, other) in cold:
      print(f"  {name:26s} {wall:9.1f} {parts['load_s']:14.1f} {parts['args_s']:12.1f} {parts['run_s']:14.1f}  "
            f"{load:.1f} / {other:.2f}")
    print("  (first batch: ours includes tracing and compiling, or loading from the compile cache, its programs)")
    torch_cold = np.mean([c[1] for c in cold if c[0].startswith("official")])
    print(f"  ours / official, cold process: {torch_cold / cold[1][1]:.2f}x (empty compile cache), "
          f"{torch_cold / cold[3][1]:.2f}x (warm compile cache)")
    loads += [c[3] for c in cold]
  warning = common.load_warning([o for _, o in loads])
  if warning:
    print(warning)
  ok = np.isfinite(o_img).all() and np.isfinite(t_out[0]).all()
  print(f"  outputs finite: {ok}; shapes ours {o_img.shape} official {t_out[0].shape[:1] + t_out[0].shape[2:]}x3; "
        f"scores per iteration, image 0: ours {' '.join(f'{v:.3f}' for v in o_scores[:, 0])}, official "
        f"{' '.join(f'{v:.3f}' for v in t_out[1][:, 0])} (other random draws; equality is tests/test_synthesis.py's)")


if __name__ == "__main__":
  app.run(main)

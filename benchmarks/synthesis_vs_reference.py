"""SynOOD stage-1 synthesis: our per-batch program vs the official PyTorch procedure, same run, same models.

Reference: `official_synthesis.Official`, the official `generate_near_ood_sample.py` loop in PyTorch on
diffusers' StableDiffusionInpaintPipeline (that file says what each iteration does). torch runs with
OMP_WAIT_POLICY=PASSIVE: with the default (spinning) policy its threads burn CPU while waiting, and under
load from other processes its UNet call ran about 5x slower, which would flatter ours.
Ours: `ours_synthesis.Ours`, `programs.BatchProgram` called as `synthesize.synthesize` calls it.

Warm: each side's first call, then --repeats warm calls interleaved (torch, ours, torch, ours, ...). Beside
each timing: the 1-minute load average (which counts this benchmark's own threads) and the cores other
processes kept busy during it (machine CPU time from /proc/stat minus ours); a warning when that passes
timing.OTHER_CPU_LIMIT, since the CPU was then shared.
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch's OpenMP starts: before any import of it
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (also puts the repository root on sys.path)
import timing  # noqa: E402
import torch_pipeline as tp  # noqa: E402
from official_synthesis import Official  # noqa: E402  (PyTorch only)
from ours_synthesis import Ours, batch_inputs, use_compile_cache  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from synood_jax.diffusion import schedulers  # noqa: E402

common.define_model_flags()
common.define_procedure_flags()
flags.DEFINE_integer("repeats", 2, "warm timed calls per side (median reported)")
flags.DEFINE_enum("torch_dtype", "float32", tp.TORCH_DTYPES, "the official side's dtype (float16/bfloat16: a GPU)")
flags.DEFINE_bool("cold", False, "also time a cold process per side (imports, loading, compile, one batch)")
flags.DEFINE_bool("cold_child", False, "internal: run one batch of ours in this process")
flags.DEFINE_string("cache_dir", "", "internal: the compile cache of a cold run")
flags.DEFINE_string("folder", "", "internal: the pipeline folder of a cold run")
flags.DEFINE_string("resnet", "", "internal: the ResNet-50 state dict of a cold run")
flags.DEFINE_list("also_attention", [], "also time ours with these attention kernels (e.g. xla: the CPU path "
                  "before xla_loop), interleaved with the two sides")
FLAGS = flags.FLAGS


def cold_child(proc: common.Procedure, image: int) -> None:
  """One batch of ours in a fresh process, as `synthesize` runs its first batch (each program traced and
  compiled as the host loop reaches it); prints its own breakdown as JSON."""
  def load():
    use_compile_cache(FLAGS.cache_dir)
    return batch_inputs(proc.batch, image), Ours(FLAGS.folder, FLAGS.resnet, proc)
  loaded = timing.timed(load)
  inputs, side = loaded.result
  args = timing.timed(lambda: side.args(*inputs))
  ran = timing.timed(lambda: side.program(*args.result), jax.block_until_ready)
  print(json.dumps({"load_s": loaded.seconds, "args_s": args.seconds, "run_s": ran.seconds}))


def cold_runs(folder: str, resnet_path: str, proc: common.Procedure, sizes: common.Sizes, image: int
              ) -> list[tuple[str, timing.Timed]]:
  """torch, ours (empty compile cache), torch, ours (warm cache): (name, the timed process, whose result is
  its own breakdown)."""
  cache = tempfile.mkdtemp(prefix="synthesis_cold_cache_")
  args = [f"--folder={folder}", f"--resnet={resnet_path}", *common.procedure_args(proc)]
  here = os.path.dirname(os.path.abspath(__file__))
  official = [os.path.join(here, "official_synthesis.py"), f"--image={image}", f"--torch_dtype={FLAGS.torch_dtype}"]
  ours = [os.path.abspath(__file__), "--cold_child", f"--cache_dir={cache}", f"--latent_size={sizes.latent_size}",
          f"--vae_channels={','.join(map(str, sizes.vae_channels))}"]
  out = []
  for name, script in (("official (torch)", official), ("ours, empty compile cache", ours),
                       ("official (torch)", official), ("ours, warm compile cache", ours)):
    run = timing.timed(lambda: subprocess.run([sys.executable, *script, *args], check=True, capture_output=True,
                                              text=True, env=dict(os.environ, JAX_PLATFORMS="cpu")))
    out.append((name, run._replace(result=json.loads(run.result.stdout.strip().splitlines()[-1]))))
  return out


def main(argv):
  del argv
  sizes, proc = common.model_sizes(), common.procedure()
  if FLAGS.cold_child:
    return cold_child(proc, sizes.image_size)
  tmp = tempfile.mkdtemp(prefix="synthesis_bench_")
  folder, image, resnet_path = tp.build_synthesis_models(tmp, sizes)
  B = proc.batch
  sources, prompts, ids = batch_inputs(B, image)
  ours = Ours(folder, resnet_path, proc)
  official = Official(folder, resnet_path, proc, FLAGS.torch_dtype)
  sides = {"official (torch)": (lambda: official.run(sources, prompts), None),
           "ours": (lambda: ours.run(sources, prompts, ids), None)}
  for kernel in FLAGS.also_attention:
    other = Ours(folder, resnet_path, proc, attention=kernel)
    sides[f"ours, attention={kernel}"] = (lambda o=other: o.run(sources, prompts, ids), None)
  res = timing.interleaved(sides, FLAGS.repeats)
  theirs, mine = res["official (torch)"], res["ours"]

  kept = len(schedulers.get_timesteps(ours.pipe.scheduler, proc.steps, proc.strength)[0])
  print(f"synthesis_vs_reference ({FLAGS.preset or 'flags'}): {common.config_line(sizes, image)}; "
        "ResNet-50 guidance (resize 232, crop 224)")
  print(f"  batch {B}, K={proc.iterations}, {proc.steps} steps x strength {proc.strength} ({kept} sampler "
        f"steps per iteration), guidance {proc.guidance}, r={proc.step_size}, m={proc.target}, "
        f"reference batch {B}; fp32")
  print("\n".join(common.device_lines(FLAGS.torch_dtype)) + f"; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
  print("  (beside each time: the 1-minute load average, which counts this benchmark's own threads, and the "
        "cores other processes used during it)")
  print(f"  {'warm':26s} {'first call s':>19s} {'median s':>9s} {'images/s':>9s}   warm runs s (load / other)")
  for name, runs in res.items():
    warm = " ".join(f"{t.seconds:.2f} ({t.load:.1f} / {t.other:.2f})" for t in runs.warm)
    print(f"  {name:26s} {runs.first.seconds:7.2f} ({runs.first.load:.1f} / {runs.first.other:.2f}) "
          f"{runs.median:9.2f} {B / runs.median:9.3f}   {warm}")
  print(f"  our compile time (first call - warm median): {mine.first.seconds - mine.median:.1f} s")
  print(f"  ours / official, warm (images/s):          {theirs.median / mine.median:.2f}x")
  print(f"  ours / official, first call incl. compile: {theirs.first.seconds / mine.first.seconds:.2f}x")
  for name in list(res)[2:]:
    print(f"  {name} / official, warm (images/s): {theirs.median / res[name].median:.2f}x; "
          f"ours / {name}: {res[name].median / mine.median:.2f}x")
  timings = [t for runs in res.values() for t in runs.all]
  if FLAGS.cold:
    cold = cold_runs(folder, resnet_path, proc, sizes, image)
    print(f"  {'cold process (one batch)':26s} {'wall s':>9s} {'load+import s':>14s} {'arguments s':>12s} "
          f"{'first batch s':>14s}  load / other")
    for name, run in cold:
      parts = run.result
      print(f"  {name:26s} {run.seconds:9.1f} {parts['load_s']:14.1f} {parts['args_s']:12.1f} "
            f"{parts['run_s']:14.1f}  {run.load:.1f} / {run.other:.2f}")
    print("  (first batch: ours includes tracing and compiling, or loading from the compile cache, its programs)")
    torch_cold = np.mean([run.seconds for name, run in cold if name.startswith("official")])
    print(f"  ours / official, cold process: {torch_cold / cold[1][1].seconds:.2f}x (empty compile cache), "
          f"{torch_cold / cold[3][1].seconds:.2f}x (warm compile cache)")
    timings += [run for _, run in cold]
  warning = timing.load_warning(timings)
  if warning:
    print(warning)
  (o_img, o_scores, _), t_out = mine.result, theirs.result
  ok = np.isfinite(o_img).all() and np.isfinite(t_out[0]).all()
  print(f"  outputs finite: {ok}; shapes ours {o_img.shape} official {t_out[0].shape[:1] + t_out[0].shape[2:]}x3; "
        f"scores per iteration, image 0: ours {' '.join(f'{v:.3f}' for v in o_scores[:, 0])}, official "
        f"{' '.join(f'{v:.3f}' for v in t_out[1][:, 0])} (other random draws; equality is tests/test_synthesis.py's)")
  return None


if __name__ == "__main__":
  app.run(main)

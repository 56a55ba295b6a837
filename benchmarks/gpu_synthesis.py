"""The prepared accelerator run: SynOOD synthesis at SD-2 in-painting's full size, ours vs the official procedure.

Random full-size SD-2 in-painting (diffusers) and ResNet-50 (built on the machine), 512 px, K = 3, PNDM
20 steps x strength 0.6 (13 UNet calls), guidance 8, r = 10, m = -5, batch 16. Rows, each printed the moment
it is measured (a run cut short still reports), in this order:
  1. ours, bfloat16 networks (attention kernel per --attention, 'auto': cuDNN flash on a GPU);
  2. the official procedure in PyTorch float16 (diffusers' SDPA attention); 3. the same in float32;
  4. ours, float32 networks.
Before them: the lowered FLOPs per image (program_cost.py: StableHLO before XLA, so cuDNN/cuBLAS calls are
counted as the math they do) and, on a GPU, a parity check of the cuDNN attention against the XLA path. Beside
ours: compile seconds and compiled.memory_analysis() of each of the four programs. Shares of peak divide
the lowered FLOPs by the warm time. Last, a second process loads and compiles from the persistent compile
cache the first one filled, and reports its start.

  python benchmarks/gpu_synthesis.py               # one H200: budget 8 minutes, building the models included
  python benchmarks/gpu_synthesis.py --tiny        # the whole script on a CPU at the tiny preset (torch bf16)
  python benchmarks/gpu_synthesis.py --count_only  # lower at SD-2 size here, run nothing: "TFLOP per image: X"
  python benchmarks/gpu_synthesis.py --memory_only=update --batch=16 --decode_chunk=4   # compile, print memory
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU in this process
os.environ.setdefault("PYTHONUNBUFFERED", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (also puts the repository root on sys.path)
import program_cost  # noqa: E402
import timing  # noqa: E402
import torch_pipeline as tp  # noqa: E402
from official_synthesis import Official  # noqa: E402
from ours_synthesis import Ours, batch_inputs, use_compile_cache  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from synood_jax.demo import tiny_sd  # noqa: E402
from synood_jax.models import attention  # noqa: E402

common.define_model_flags()  # --tiny is --preset=tiny
common.define_procedure_flags()  # --batch: 16 unless given (2 with --tiny)
flags.DEFINE_integer("repeats", 2, "warm timed calls per side (median reported)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "--memory_only: our networks' dtype")
flags.DEFINE_bool("tiny", False, "run at the tiny preset (a CPU check that the script works end to end)")
flags.DEFINE_bool("count_only", False, "lower the programs at SD-2 size and print the FLOPs; run nothing")
flags.DEFINE_list("memory_only", [], "compile these programs (start, sample, update, outcome) at SD-2 size for "
                  "--batch / --dtype / --decode_chunk on this backend and print their memory; run nothing")
flags.DEFINE_float("peak_tflops", 989.0, "the chip's dense bf16 peak (H200 SXM: 989)")
flags.DEFINE_enum("attention", "auto", list(attention.CHOICES), "our attention kernel")
flags.DEFINE_integer("decode_chunk", 4, "rows per step of the decoder and its gradient (0: the whole batch)")
flags.DEFINE_bool("second_process", True, "time a second process's start from the persistent compile cache")
flags.DEFINE_bool("start_child", False, "internal: load, compile from the cache, run one batch; print JSON")
flags.DEFINE_string("cache_dir", "", "the persistent compile cache (empty: a new temporary folder)")
flags.DEFINE_string("folder", "", "internal: the pipeline folder of --start_child")
flags.DEFINE_string("resnet", "", "internal: the ResNet-50 state dict of --start_child")
FLAGS = flags.FLAGS


def say(line: str = "") -> None:
  print(line, flush=True)


def sd2_pipeline(dtype, attention_kernel: str = "xla"):
  text = dict(tiny_sd.TINY_TEXT_CONFIG, **tp.SD2_TEXT, vocab_size=49408)
  return program_cost.abstract_pipeline(tp.SD2_INPAINT_UNET, tp.SD2_VAE, text,
                                        tiny_sd.SD2_INPAINT_SCHEDULER, dtype, attention_kernel)


def lowered_flops(pipe_params_logits, proc: common.Procedure, image: int) -> dict:
  return program_cost.flops_per_batch(*pipe_params_logits, proc.batch, image, proc.steps, proc.strength,
                                      proc.iterations)


def folder_flops(folder: str, proc: common.Procedure, image: int) -> dict:
  return lowered_flops(program_cost.abstract_pipeline(*program_cost.folder_configs(folder), jnp.float32), proc, image)


def attention_parity() -> str:
  """cuDNN flash attention vs the XLA path at SD-2's 64x64 self-attention (bf16, 32 rows x 5 heads)."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((32, 4096, 5, 64)), jnp.bfloat16) for _ in range(3))
  fused = jax.jit(lambda *a: attention.attention(*a, kernel=FLAGS.attention))(q, k, v)
  plain = jax.jit(lambda *a: attention.attention(*a, kernel="xla"))(q, k, v)
  err = float(jnp.max(jnp.abs(fused.astype(jnp.float32) - plain.astype(jnp.float32))))
  scale = float(jnp.max(jnp.abs(plain.astype(jnp.float32))))
  kernel = attention.resolve(FLAGS.attention, q, k)
  return f"  attention check: {kernel} vs xla at [32, 4096, 5, 64] bf16: max |diff| {err:.2e} (max |xla| {scale:.2f})"


def rate_line(name: str, warm: float, batch: int, flops: dict, notes: str) -> str:
  rate, peak = flops["total"] / warm, FLAGS.peak_tflops * 1e12
  return (f"  {name:32s} {warm:9.3f} {batch / warm:9.3f}   {rate / 1e12:6.1f} TFLOP/s = {100 * rate / peak:5.1f}% "
          f"of peak; {notes}")


def load_ours(folder: str, resnet_path: str, proc: common.Procedure, dtype) -> Ours:
  return Ours(folder, resnet_path, proc, dtype=dtype, attention=FLAGS.attention, decode_chunk=FLAGS.decode_chunk)


def measure_ours(name: str, folder: str, resnet_path: str, proc, dtype, inputs, flops: dict) -> float:
  """Warm median of ours, compiled ahead (so no first call is timed)."""
  ours = timing.timed(lambda: load_ours(folder, resnet_path, proc, dtype))
  parts = ours.result.compile(*inputs)
  for line in program_cost.memory_lines(ours.result.program):
    say(line)
  warm = timing.repeated(lambda: ours.result.run(*inputs), FLAGS.repeats).median
  say(rate_line(name, warm, proc.batch, flops, f"load {ours.seconds:.1f} s, compile {parts['total_s']:.1f} s "
                f"(lower {parts['lower_s']:.1f} s)"))
  return warm


def measure_official(name: str, folder: str, resnet_path: str, proc, dtype: str, inputs, flops: dict) -> float:
  import torch
  official = Official(folder, resnet_path, proc, dtype)
  sources, prompts, _ = inputs
  runs = timing.interleaved({name: (lambda: official.run(sources, prompts), None)}, FLAGS.repeats)[name]
  say(rate_line(name, runs.median, proc.batch, flops, f"first call {runs.first.seconds:.1f} s"))
  official = None  # frees its (GPU) memory before the next side loads
  if torch.cuda.is_available():
    torch.cuda.empty_cache()
  return runs.median


def start_child(proc: common.Procedure, image: int) -> None:
  """A second process: load the models, compile (from the persistent cache), run one batch."""
  def load():
    use_compile_cache(FLAGS.cache_dir)
    return batch_inputs(proc.batch, image), load_ours(FLAGS.folder, FLAGS.resnet, proc, jnp.bfloat16)
  loaded = timing.timed(load)
  inputs, ours = loaded.result
  compiled = timing.timed(lambda: ours.compile(*inputs))
  ran = timing.timed(lambda: ours.run(*inputs), jax.block_until_ready)
  print(json.dumps({"import_load_s": loaded.seconds, "compile_s": compiled.result["total_s"],
                    "first_batch_s": ran.seconds, "start_s": loaded.seconds + compiled.seconds}))


def abstract_only(proc: common.Procedure) -> None:
  """--memory_only / --count_only: SD-2 at full size from abstract params, nothing run."""
  if FLAGS.memory_only:
    done = timing.timed(lambda: program_cost.compiled_memory(
        *sd2_pipeline(jnp.dtype(FLAGS.dtype), FLAGS.attention), proc.batch, 512, proc.steps, proc.iterations,
        FLAGS.decode_chunk, FLAGS.memory_only))
    say(f"gpu_synthesis --memory_only: SD-2 in-painting at 512 px, batch {proc.batch}, {FLAGS.dtype} networks, "
        f"decode_chunk {FLAGS.decode_chunk}, on {jax.devices()[0].platform}, compiled in "
        f"{done.seconds:.0f} s (nothing run)")
  else:
    done = timing.timed(lambda: program_cost.flops_lines(lowered_flops(sd2_pipeline(jnp.bfloat16), proc, 512),
                                                         proc.batch))
    say(f"gpu_synthesis --count_only: SD-2 in-painting at 512 px, batch {proc.batch}, K={proc.iterations}, "
        f"lowered on {jax.devices()[0].platform} in {done.seconds:.0f} s (nothing run)")
  for line in done.result:
    say(line)


def main(argv):
  del argv
  sizes = common.model_sizes("tiny" if FLAGS.tiny else None)
  proc = common.procedure(**({} if FLAGS.tiny or FLAGS["batch"].present else {"batch": 16}))
  if FLAGS.start_child:
    return start_child(proc, sizes.image_size if FLAGS.tiny else 512)
  if FLAGS.memory_only or FLAGS.count_only:
    return abstract_only(proc)
  import torch
  cuda = torch.cuda.is_available()
  low = "float16" if cuda else "bfloat16"  # CPU torch has no float16 convolutions
  cache = FLAGS.cache_dir or tempfile.mkdtemp(prefix="gpu_synthesis_cache_")
  use_compile_cache(cache)
  tmp = tempfile.mkdtemp(prefix="gpu_synthesis_")
  built = timing.timed(lambda: tp.build_synthesis_models(tmp, sizes, sd2=not FLAGS.tiny))
  folder, image, resnet_path = built.result
  B = proc.batch
  say(f"gpu_synthesis: built {'the tiny' if FLAGS.tiny else 'a random full-size SD-2 in-painting'} pipeline and "
      f"ResNet-50 in {built.seconds:.0f} s; {image} px, batch {B}, K={proc.iterations}, "
      f"attention {FLAGS.attention}, decode_chunk {FLAGS.decode_chunk}")
  say("\n".join(common.device_lines(f"{low} and float32")))
  flops = folder_flops(folder, proc, image)
  for line in program_cost.flops_lines(flops, B):
    say(line)
  if jax.devices()[0].platform == "gpu":
    say(attention_parity())
  inputs = batch_inputs(B, image)
  say(f"  {'side':32s} {'s / batch':>9s} {'images/s':>9s}   notes (peak {FLAGS.peak_tflops:.0f} TFLOP/s dense bf16"
      + ("" if cuda else "; on a CPU the shares mean nothing") + ")")
  models = (folder, resnet_path, proc)
  t = {}
  t["ours bf16"] = measure_ours("ours (bfloat16 networks)", *models, jnp.bfloat16, inputs, flops)
  t["official low"] = measure_official(f"official (torch {low})", *models, low, inputs, flops)
  say(f"  ours bf16 / official {low}: {t['official low'] / t['ours bf16']:.2f}x")
  t["official fp32"] = measure_official("official (torch float32)", *models, "float32", inputs, flops)
  t["ours fp32"] = measure_ours("ours (float32 networks)", *models, jnp.float32, inputs, flops)
  say(f"  ours fp32 / official fp32: {t['official fp32'] / t['ours fp32']:.2f}x; ours bf16 / official fp32: "
      f"{t['official fp32'] / t['ours bf16']:.2f}x")
  say(f"  at this pace 50,000 images take {50000 / (B / t['ours bf16']) / 3600:.2f} h (ours bf16) vs "
      f"{50000 / (B / t['official low']) / 3600:.2f} h (official {low})")
  if FLAGS.second_process:
    args = [f"--folder={folder}", f"--resnet={resnet_path}", *common.procedure_args(proc), f"--cache_dir={cache}",
            f"--attention={FLAGS.attention}", f"--decode_chunk={FLAGS.decode_chunk}", "--start_child"]
    res = subprocess.run([sys.executable, os.path.abspath(__file__), *args, *(["--tiny"] if FLAGS.tiny else [])],
                         capture_output=True, text=True, check=False)
    line = (res.stdout.strip().splitlines() or ["{}"])[-1]
    say(f"  second process from the compile cache (bf16): {line}" if res.returncode == 0 else
        f"  second process failed: {res.stderr.strip().splitlines()[-1:] }")
  return None


if __name__ == "__main__":
  app.run(main)

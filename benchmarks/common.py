"""Shared pieces of the in-painting / synthesis benchmarks: a tiny-but-not-trivial SD-2-in-painting-shaped
diffusers pipeline built in PyTorch with random weights, timing helpers and device reporting.

The pipeline is SD-2-in-painting shaped: a 9-channel UNet (CrossAttn, CrossAttn, Down blocks; linear
projections; head dims as SD-2), a KL VAE whose depth sets the latent/pixel ratio, an OpenCLIP-like
CLIPTextModel (gelu) whose width is the UNet's cross_attention_dim, the SD-2-in-painting PNDM scheduler,
and a character-level CLIP tokenizer. Sizes come from absl flags (defined here, shared by both mains).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

flags.DEFINE_list("unet_channels", ["32", "64", "128"], "UNet block_out_channels (3 levels: CrossAttn, CrossAttn, Down)")
flags.DEFINE_integer("unet_layers", 1, "UNet layers_per_block")
flags.DEFINE_integer("head_dim", 8, "UNet attention heads per level (diffusers' attention_head_dim)")
flags.DEFINE_list("vae_channels", ["32", "64", "64"], "VAE block_out_channels (pixels = latents * 2^(levels-1))")
flags.DEFINE_integer("text_width", 64, "CLIPTextModel hidden size = UNet cross_attention_dim")
flags.DEFINE_integer("text_layers", 2, "CLIPTextModel layers")
flags.DEFINE_integer("latent_size", 32, "latent height/width")
flags.DEFINE_integer("batch", 2, "images per batch")
flags.DEFINE_integer("steps", 20, "num_inference_steps (12 denoising steps after strength 0.6)")
flags.DEFINE_float("strength", 0.6, "in-painting strength")
flags.DEFINE_float("guidance", 8.0, "classifier-free guidance scale")
flags.DEFINE_integer("repeats", 2, "warm timed calls per side (median reported)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "our networks' dtype (latents, scheduler stay fp32)")
flags.DEFINE_enum("torch_dtype", "float32", ["float32", "float16", "bfloat16"],
                  "diffusers' dtype (float16/bfloat16 are for a GPU)")
flags.DEFINE_integer("iterations", 3, "K refinement iterations")
flags.DEFINE_float("step_size", 10.0, "r")
flags.DEFINE_float("target", -5.0, "m")
flags.DEFINE_string("folder", "", "internal: the pipeline folder of a cold run")
flags.DEFINE_string("resnet", "", "internal: the ResNet-50 state dict of a cold run")
flags.DEFINE_string("pipeline", "", "an existing diffusers in-painting folder (e.g. SD-2-inpainting); empty: random tiny")
flags.DEFINE_enum("preset", "", ["", "tiny", "small"], "model sizes (flags given on the command line win)")
FLAGS = flags.FLAGS

# Named sizes of the random pipeline. tiny: 64 px images; small: 256 px, SD-like 8x VAE.
PRESETS = {
    "tiny": dict(unet_channels=["32", "64", "128"], latent_size=16, vae_channels=["32", "64", "64"]),
    "small": dict(unet_channels=["64", "128", "256"], latent_size=32, vae_channels=["32", "64", "128", "128"]),
}


def apply_preset() -> None:
  """Set the preset's sizes on every flag the command line did not give."""
  for name, value in PRESETS.get(FLAGS.preset, {}).items():
    if not FLAGS[name].present:
      FLAGS[name].value = value


OTHER_CPU_LIMIT = 0.25  # cores busy with other processes during a timing, above which it is flagged


def load_average() -> float:
  return os.getloadavg()[0]


def _busy_seconds() -> float:
  """CPU seconds spent by the whole machine (every process, every core) since boot, from /proc/stat."""
  with open("/proc/stat") as f:
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
  return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
  """CPU seconds of this process and of the children it has waited for."""
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


class OtherCpu:
  """Measures, over a block, the cores kept busy by *other* processes (machine CPU time minus ours, over
  the wall time). The 1-minute load average counts the benchmark's own threads, so on 2 cores it reads
  about 2 even on an idle machine; this is the number that says whether the timing was shared."""

  def __enter__(self):
    self.start = (time.perf_counter(), _busy_seconds(), _own_seconds())
    return self

  def __exit__(self, *exc):
    wall, busy, own = (b - a for a, b in zip(self.start, (time.perf_counter(), _busy_seconds(), _own_seconds())))
    self.cores = max(0.0, (busy - own) / max(wall, 1e-9))
    return False


def load_warning(others) -> str | None:
  """A warning line when other processes used the CPU during the timings."""
  worst = max(others)
  if worst > OTHER_CPU_LIMIT:
    return (f"  WARNING: other processes kept {worst:.2f} cores busy during a timing (limit {OTHER_CPU_LIMIT}): "
            f"the CPU was shared, so the ratios above are not valid measurements.")
  return None

PROMPTS = ["a green meadow under a cloudy sky", "the sky over a city at night", "a wooden table with cups",
           "a dog lying on a red carpet", "waves breaking on rocks", "a street with parked bicycles"]


def prompts(n: int) -> list[str]:
  """The official prompt form, `"A photo only remain " + answer[:73] + "."`."""
  return ["A photo only remain " + PROMPTS[i % len(PROMPTS)][:73] + "." for i in range(n)]


def synthesis_inputs(batch: int, image: int):
  """A synthesis batch: source images NHWC in [-1, 1] and the official prompt form."""
  sources = np.random.default_rng(0).uniform(-1, 1, (batch, image, image, 3)).astype(np.float32)
  return sources, prompts(batch)


def image_size() -> int:
  """Pixels per side of the random pipeline the flags describe (latents x 2^(VAE levels - 1))."""
  return FLAGS.latent_size * 2 ** (len(FLAGS.vae_channels) - 1)


def torch_device():
  import torch
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_dtype():
  import torch
  return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[FLAGS.torch_dtype]


def sync(device=None):
  import torch
  if (device or torch_device()).type == "cuda":
    torch.cuda.synchronize()


def device_lines() -> list[str]:
  import jax
  import torch
  d = jax.devices()[0]
  dev = torch_device()
  torch_name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                else f"cpu, {torch.get_num_threads()} threads")
  return [f"  ours (JAX {jax.__version__}):       {len(jax.devices())} x {d.platform} ({d.device_kind})",
          f"  diffusers (torch {torch.__version__}): {dev.type} ({torch_name}), {FLAGS.torch_dtype}"]


# stabilityai/stable-diffusion-2-inpainting's component configs, written out by hand (no hub at run time).
SD2_INPAINT_UNET = {
    "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 9, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True, "upcast_attention": False,
}
SD2_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 512, "scaling_factor": 0.18215,
}
# OpenCLIP ViT-H/14's text tower as SD-2 uses it (its vocabulary size comes from the tokenizer in use).
SD2_TEXT = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
            "hidden_act": "gelu", "layer_norm_eps": 1e-5, "max_position_embeddings": 77, "projection_dim": 512}


def unet_config(channels, layers, heads, cross_dim, sample_size) -> dict:
  n = len(channels)
  return {
      "sample_size": sample_size, "in_channels": 9, "out_channels": 4, "block_out_channels": list(channels),
      "layers_per_block": layers,
      "down_block_types": ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
      "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1),
      "mid_block_type": "UNetMidBlock2DCrossAttn",
      # SD-2 uses heads of width 64; here a fixed head count per level, as the tiny test config
      "attention_head_dim": [heads] * n, "cross_attention_dim": cross_dim, "use_linear_projection": True,
      "upcast_attention": False, "norm_num_groups": min(32, channels[0]), "norm_eps": 1e-5,
      "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
  }


def vae_config(channels, sample_size) -> dict:
  n = len(channels)
  return {"sample_size": sample_size, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
          "block_out_channels": list(channels), "layers_per_block": 1,
          "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
          "norm_num_groups": min(32, channels[0]), "act_fn": "silu", "scaling_factor": 0.18215}


def _perturbed(model, seed):
  """Random init leaves zero-initialised output convs; add noise so every path carries signal."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn(p.shape, generator=g))
  return model.eval()


def make_torch_pipeline(root: str, sd2: bool = False):
  """(folder, image_size): a random diffusers StableDiffusionInpaintPipeline saved in root/pipe (sizes from
  the flags, or SD-2 in-painting's own with sd2=True), or FLAGS.pipeline as it is."""
  import diffusers
  import torch
  import transformers

  from synood_jax.demo import tiny_clip as tiny, tiny_sd

  if FLAGS.pipeline:
    vae = diffusers.AutoencoderKL.load_config(os.path.join(FLAGS.pipeline, "vae"))
    return FLAGS.pipeline, FLAGS.latent_size * 2 ** (len(vae["block_out_channels"]) - 1)
  torch.manual_seed(0)
  if sd2:
    image = 512
    unet = diffusers.UNet2DConditionModel(**SD2_INPAINT_UNET).eval()
    vae = diffusers.AutoencoderKL(**SD2_VAE).eval()
    text_cfg = dict(tiny_sd.TINY_TEXT_CONFIG, **SD2_TEXT)
  else:
    unet_ch = [int(c) for c in FLAGS.unet_channels]
    vae_ch = [int(c) for c in FLAGS.vae_channels]
    image = FLAGS.latent_size * 2 ** (len(vae_ch) - 1)
    unet = _perturbed(diffusers.UNet2DConditionModel(**unet_config(
        unet_ch, FLAGS.unet_layers, FLAGS.head_dim, FLAGS.text_width, FLAGS.latent_size)), 1)
    vae = _perturbed(diffusers.AutoencoderKL(**vae_config(vae_ch, image)), 2)
    text_cfg = dict(tiny_sd.TINY_TEXT_CONFIG, hidden_size=FLAGS.text_width,
                    intermediate_size=4 * FLAGS.text_width, num_hidden_layers=FLAGS.text_layers)
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_cfg)).eval()
  tok_dir = tiny.write_char_tokenizer(os.path.join(root, "tok"))
  pipe = diffusers.StableDiffusionInpaintPipeline(
      vae=vae, text_encoder=text, tokenizer=transformers.CLIPTokenizer.from_pretrained(tok_dir), unet=unet,
      scheduler=diffusers.PNDMScheduler.from_config(tiny_sd.SD2_INPAINT_SCHEDULER), safety_checker=None,
      feature_extractor=None, requires_safety_checker=False)
  folder = os.path.join(root, "pipe")
  pipe.save_pretrained(folder)
  return folder, image


def load_torch_pipeline(folder: str):
  import diffusers
  pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
      folder, torch_dtype=torch_dtype(), safety_checker=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  return pipe.to(torch_device())


def config_line(image: int) -> str:
  if FLAGS.pipeline:
    return f"pipeline {FLAGS.pipeline}, {image}px images, {FLAGS.latent_size}px latents"
  return (f"UNet {tuple(int(c) for c in FLAGS.unet_channels)} x{FLAGS.unet_layers} layers, VAE "
          f"{tuple(int(c) for c in FLAGS.vae_channels)}, text width {FLAGS.text_width}; "
          f"{FLAGS.latent_size}px latents / {image}px images")


def timed(fn, sync_fn=None):
  """(result, seconds, other processes' cores) of one call; `sync_fn(result)` waits for asynchronous work."""
  with OtherCpu() as other:
    t0 = time.perf_counter()
    out = fn()
    if sync_fn is not None:
      sync_fn(out)
    seconds = time.perf_counter() - t0
  return out, seconds, other.cores


def first_and_warm(sides, repeats: int):
  """sides: {name: (fn, sync_fn)}. Each side's first call, then `repeats` warm calls interleaved
  (a, b, a, b, ...) so that load from other processes hits both alike. Returns {name: (last result,
  first-call s, median warm s, [warm s], {'first': (load, other), 'warm': [(load, other)]})} with the
  1-minute load average read right after each call and the cores other processes used during it."""
  first, warm, out, loads = {}, {k: [] for k in sides}, {}, {k: {"warm": []} for k in sides}
  for name, (fn, sync_fn) in sides.items():
    out[name], first[name], other = timed(fn, sync_fn)
    loads[name]["first"] = (load_average(), other)
  for _ in range(repeats):
    for name, (fn, sync_fn) in sides.items():
      out[name], t, other = timed(fn, sync_fn)
      warm[name].append(t)
      loads[name]["warm"].append((load_average(), other))
  return {k: (out[k], first[k], statistics.median(warm[k]), warm[k], loads[k]) for k in sides}


def random_resnet50(path: str, seed: int = 0):
  """A random torchvision-layout ResNet-50 (1000 classes) saved as a state dict at `path`; returns the
  torch model (eval mode). The builder is the tests' (torchvision is not installed beside this torch)."""
  import torch
  from synood_jax.testing.torch_reference import random_resnet  # pylint: disable=import-outside-toplevel
  model = random_resnet((3, 4, 6, 3), 64, 1000, seed=seed)
  torch.save(model.state_dict(), path)
  return model


def nchw(x):
  import torch
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t) -> np.ndarray:
  return t.detach().float().cpu().numpy().transpose(0, 2, 3, 1)

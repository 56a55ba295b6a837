"""What the synthesis / in-painting benchmarks share: the sizes of the random pipeline (`Sizes`) and the
procedure's values (`Procedure`) as frozen dataclasses, the flag groups a script may declare for them, the
official prompt form and the device report.

Importing this defines no flag: a script calls `define_model_flags()` / `define_procedure_flags()` from its
own module body when it wants that group, then reads the values with `model_sizes()` / `procedure()` and
passes them down; the shared modules take explicit arguments. No JAX or torch at import (the official,
torch-only side imports this too).
"""
from __future__ import annotations

import dataclasses
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's synood_jax before an installed one

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

flags.disclaim_key_flags()  # the flags the helpers below define belong to the script that calls them


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The random SD-2-in-painting-shaped pipeline, or an existing folder (`pipeline`) as it is."""
  unet_channels: tuple[int, ...] = (32, 64, 128)  # 3 levels: CrossAttn, CrossAttn, Down
  unet_layers: int = 1
  head_dim: int = 8  # heads per level (diffusers' attention_head_dim)
  vae_channels: tuple[int, ...] = (32, 64, 64)
  text_width: int = 64  # = the UNet's cross_attention_dim
  text_layers: int = 2
  latent_size: int = 32
  pipeline: str = ""

  @property
  def image_size(self) -> int:
    """Pixels per side of the random pipeline (latents x 2^(VAE levels - 1))."""
    return self.latent_size * 2 ** (len(self.vae_channels) - 1)


# Named sizes of the random pipeline. tiny: 64 px images; small: 256 px, SD-like 8x VAE.
PRESETS = {
    "tiny": dict(unet_channels=(32, 64, 128), latent_size=16, vae_channels=(32, 64, 64)),
    "small": dict(unet_channels=(64, 128, 256), latent_size=32, vae_channels=(32, 64, 128, 128)),
}


@dataclasses.dataclass(frozen=True)
class Procedure:
  """The synthesis procedure's values (the sampler's alone for the in-painting benchmark)."""
  batch: int = 2
  steps: int = 20  # num_inference_steps (12 denoising steps after strength 0.6)
  strength: float = 0.6
  guidance: float = 8.0
  iterations: int = 3  # K refinement iterations
  step_size: float = 10.0  # r
  target: float = -5.0  # m


def define_model_flags() -> None:
  """--preset and the `Sizes` flags, for the calling script."""
  d = Sizes
  flags.DEFINE_enum("preset", "", ["", *PRESETS], "model sizes (flags given on the command line win)")
  flags.DEFINE_list("unet_channels", list(map(str, d.unet_channels)),
                    "UNet block_out_channels (3 levels: CrossAttn, CrossAttn, Down)")
  flags.DEFINE_integer("unet_layers", d.unet_layers, "UNet layers_per_block")
  flags.DEFINE_integer("head_dim", d.head_dim, "UNet attention heads per level (diffusers' attention_head_dim)")
  flags.DEFINE_list("vae_channels", list(map(str, d.vae_channels)),
                    "VAE block_out_channels (pixels = latents * 2^(levels-1))")
  flags.DEFINE_integer("text_width", d.text_width, "CLIPTextModel hidden size = UNet cross_attention_dim")
  flags.DEFINE_integer("text_layers", d.text_layers, "CLIPTextModel layers")
  flags.DEFINE_integer("latent_size", d.latent_size, "latent height/width")
  flags.DEFINE_string("pipeline", "", "an existing diffusers in-painting folder (e.g. SD-2-inpainting); empty: random")


def model_sizes(preset: str | None = None) -> Sizes:
  """The `Sizes` the flags give: the preset (--preset unless given) under the flags set on the command line."""
  f = flags.FLAGS
  values = {k.name: f[k.name].value for k in dataclasses.fields(Sizes)}
  for name, value in PRESETS.get(f.preset if preset is None else preset, {}).items():
    if not f[name].present:
      values[name] = value
  return Sizes(**dict(values, unet_channels=tuple(int(c) for c in values["unet_channels"]),
                      vae_channels=tuple(int(c) for c in values["vae_channels"])))


def define_procedure_flags(refinement: bool = True) -> None:
  """The `Procedure` flags for the calling script: the sampler's, and the refinement's unless refinement=False."""
  d = Procedure
  flags.DEFINE_integer("batch", d.batch, "images per batch")
  flags.DEFINE_integer("steps", d.steps, "num_inference_steps (12 denoising steps after strength 0.6)")
  flags.DEFINE_float("strength", d.strength, "in-painting strength")
  flags.DEFINE_float("guidance", d.guidance, "classifier-free guidance scale")
  if refinement:
    flags.DEFINE_integer("iterations", d.iterations, "K refinement iterations")
    flags.DEFINE_float("step_size", d.step_size, "r")
    flags.DEFINE_float("target", d.target, "m")


def procedure(**overrides) -> Procedure:
  """The `Procedure` the flags give (the dataclass's defaults for a group the script did not define)."""
  f = flags.FLAGS
  values = {k.name: f[k.name].value for k in dataclasses.fields(Procedure) if k.name in f}
  return Procedure(**dict(values, **overrides))


def procedure_args(p: Procedure) -> list[str]:
  """The command line that gives a child process the same procedure."""
  return [f"--{k.name}={getattr(p, k.name)}" for k in dataclasses.fields(Procedure)]


PROMPTS = ["a green meadow under a cloudy sky", "the sky over a city at night", "a wooden table with cups",
           "a dog lying on a red carpet", "waves breaking on rocks", "a street with parked bicycles"]


def prompts(n: int) -> list[str]:
  """The official prompt form, `"A photo only remain " + answer[:73] + "."`."""
  return ["A photo only remain " + PROMPTS[i % len(PROMPTS)][:73] + "." for i in range(n)]


def synthesis_inputs(batch: int, image: int):
  """A synthesis batch: source images NHWC in [-1, 1] and the official prompt form."""
  sources = np.random.default_rng(0).uniform(-1, 1, (batch, image, image, 3)).astype(np.float32)
  return sources, prompts(batch)


def config_line(sizes: Sizes, image: int) -> str:
  if sizes.pipeline:
    return f"pipeline {sizes.pipeline}, {image}px images, {sizes.latent_size}px latents"
  return (f"UNet {sizes.unet_channels} x{sizes.unet_layers} layers, VAE {sizes.vae_channels}, text width "
          f"{sizes.text_width}; {sizes.latent_size}px latents / {image}px images")


def device_lines(torch_dtype: str) -> list[str]:
  """Where each side runs; `torch_dtype` names diffusers' dtype(s)."""
  import jax
  import torch
  from torch_pipeline import torch_device  # pylint: disable=import-outside-toplevel
  d = jax.devices()[0]
  dev = torch_device()
  torch_name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                else f"cpu, {torch.get_num_threads()} threads")
  return [f"  ours (JAX {jax.__version__}):       {len(jax.devices())} x {d.platform} ({d.device_kind})",
          f"  diffusers (torch {torch.__version__}): {dev.type} ({torch_name}), {torch_dtype}"]

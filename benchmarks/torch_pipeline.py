"""The PyTorch models both sides of a benchmark load: a random SD-2-in-painting-shaped diffusers pipeline
and a random ResNet-50, saved to a folder (ours loads them with our loaders), and the torch helpers.

The pipeline is SD-2-in-painting shaped: a 9-channel UNet (CrossAttn, CrossAttn, Down blocks; linear
projections; head dims as SD-2), a KL VAE whose depth sets the latent/pixel ratio, an OpenCLIP-like
CLIPTextModel (gelu) whose width is the UNet's cross_attention_dim, the SD-2-in-painting PNDM scheduler,
and a character-level CLIP tokenizer; its sizes are a `common.Sizes`. torch, diffusers and transformers
are imported inside the functions and no JAX anywhere: the official side's cold process pays for neither.
"""
from __future__ import annotations

import os

import numpy as np

from common import Sizes

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


def perturbed(model, seed):
  """Random init leaves zero-initialised output convs; add noise so every path carries signal."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn(p.shape, generator=g))
  return model.eval()


def make_torch_pipeline(root: str, sizes: Sizes, sd2: bool = False):
  """(folder, image_size): a random diffusers StableDiffusionInpaintPipeline saved in root/pipe (of these
  sizes, or SD-2 in-painting's own with sd2=True), or sizes.pipeline as it is."""
  import diffusers
  import torch
  import transformers

  from synood_jax.demo import tiny_clip as tiny, tiny_sd

  if sizes.pipeline:
    vae = diffusers.AutoencoderKL.load_config(os.path.join(sizes.pipeline, "vae"))
    return sizes.pipeline, sizes.latent_size * 2 ** (len(vae["block_out_channels"]) - 1)
  torch.manual_seed(0)
  if sd2:
    image = 512
    unet = diffusers.UNet2DConditionModel(**SD2_INPAINT_UNET).eval()
    vae = diffusers.AutoencoderKL(**SD2_VAE).eval()
    text_cfg = dict(tiny_sd.TINY_TEXT_CONFIG, **SD2_TEXT)
  else:
    image = sizes.image_size
    unet = perturbed(diffusers.UNet2DConditionModel(**unet_config(
        sizes.unet_channels, sizes.unet_layers, sizes.head_dim, sizes.text_width, sizes.latent_size)), 1)
    vae = perturbed(diffusers.AutoencoderKL(**vae_config(sizes.vae_channels, image)), 2)
    text_cfg = dict(tiny_sd.TINY_TEXT_CONFIG, hidden_size=sizes.text_width,
                    intermediate_size=4 * sizes.text_width, num_hidden_layers=sizes.text_layers)
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_cfg)).eval()
  tok_dir = tiny.write_char_tokenizer(os.path.join(root, "tok"))
  pipe = diffusers.StableDiffusionInpaintPipeline(
      vae=vae, text_encoder=text, tokenizer=transformers.CLIPTokenizer.from_pretrained(tok_dir), unet=unet,
      scheduler=diffusers.PNDMScheduler.from_config(tiny_sd.SD2_INPAINT_SCHEDULER), safety_checker=None,
      feature_extractor=None, requires_safety_checker=False)
  folder = os.path.join(root, "pipe")
  pipe.save_pretrained(folder)
  return folder, image


def random_resnet50(path: str, seed: int = 0):
  """A random torchvision-layout ResNet-50 (1000 classes) saved as a state dict at `path`; returns the
  torch model (eval mode). The builder is synood_jax.testing's (torchvision is not installed beside this torch)."""
  import torch
  from synood_jax.testing.torch_reference import random_resnet  # pylint: disable=import-outside-toplevel
  model = random_resnet((3, 4, 6, 3), 64, 1000, seed=seed)
  torch.save(model.state_dict(), path)
  return model


def build_synthesis_models(root: str, sizes: Sizes, sd2: bool = False):
  """(pipeline folder, image size, ResNet-50 path): random models saved for both sides of a synthesis run."""
  folder, image = make_torch_pipeline(root, sizes, sd2=sd2)
  resnet_path = os.path.join(root, "resnet50.pth")
  random_resnet50(resnet_path)
  return folder, image, resnet_path


def torch_device():
  import torch
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


TORCH_DTYPES = ["float32", "float16", "bfloat16"]  # float16/bfloat16 are for a GPU


def torch_dtype(name: str):
  import torch
  assert name in TORCH_DTYPES, name
  return getattr(torch, name)


def load_torch_pipeline(folder: str, dtype: str = "float32"):
  import diffusers
  pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
      folder, torch_dtype=torch_dtype(dtype), safety_checker=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  return pipe.to(torch_device())


def sync(device=None):
  """Wait for the device's queued work (CUDA runs asynchronously)."""
  import torch
  if (device or torch_device()).type == "cuda":
    torch.cuda.synchronize()


def nchw(x):
  import torch
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t) -> np.ndarray:
  return t.detach().float().cpu().numpy().transpose(0, 2, 3, 1)

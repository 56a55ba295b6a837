"""A tiny random Stable Diffusion 2 in-painting pipeline folder, written with our own code (no torch).

The folder has diffusers' layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/),
so diffusers' StableDiffusionInpaintPipeline loads it too, and our loader reads it by the same path as
the real stabilityai/stable-diffusion-2-inpainting folder.
"""
from __future__ import annotations

import os

import jax

from synood_jax import fileio
from synood_jax.models import checkpoint_io
from synood_jax.models import clip, clip_config
from synood_jax.demo import tiny_clip as tiny
from synood_jax.models import unet as unet_lib
from synood_jax.models import vae as vae_lib
from synood_jax.models.unet import TINY_UNET_CONFIG  # noqa: F401  (re-exported for tests and demo)
from synood_jax.models.vae import TINY_VAE_CONFIG  # noqa: F401

# stabilityai/stable-diffusion-2-inpainting scheduler/scheduler_config.json
SD2_INPAINT_SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "prediction_type": "epsilon",
}

_VOCAB = tiny.char_vocab()
# A CLIPTextModel (no projection, gelu as SD-2's OpenCLIP encoder) whose width is the tiny UNet's
# cross_attention_dim.
TINY_TEXT_CONFIG = {
    "vocab_size": len(_VOCAB), "hidden_size": TINY_UNET_CONFIG["cross_attention_dim"], "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
    "max_position_embeddings": 77, "eos_token_id": _VOCAB[tiny.EOS], "bos_token_id": _VOCAB[tiny.BOS],
    "pad_token_id": _VOCAB[tiny.EOS], "projection_dim": 32,
}

MODEL_INDEX = {
    "_class_name": "StableDiffusionInpaintPipeline", "_diffusers_version": "0.42.1",
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
    "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
}


def make_tiny_inpaint_pipeline(folder: str, seed: int = 0) -> str:
  """Write a random tiny SD-2-in-painting-shaped pipeline to `folder`; returns it."""
  k_unet, k_vae = jax.random.split(jax.random.PRNGKey(seed))
  unet_lib.save(os.path.join(folder, "unet"), TINY_UNET_CONFIG, unet_lib.init_params(TINY_UNET_CONFIG, k_unet))
  vae_lib.save(os.path.join(folder, "vae"), TINY_VAE_CONFIG, vae_lib.init_params(TINY_VAE_CONFIG, k_vae))
  text_cfg = clip_config.config_from_hf({"model_type": "clip_text_model", **TINY_TEXT_CONFIG}, projection=False)
  clip.save_pretrained(clip.create(text_cfg, seed=seed), os.path.join(folder, "text_encoder"))
  tiny.write_char_tokenizer(os.path.join(folder, "tokenizer"))
  checkpoint_io.write_config(os.path.join(folder, "scheduler"), SD2_INPAINT_SCHEDULER,
                             name="scheduler_config.json")
  fileio.write_json(os.path.join(folder, "model_index.json"), MODEL_INDEX, indent=2)
  return folder

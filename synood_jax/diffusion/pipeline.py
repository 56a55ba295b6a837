"""Load a diffusers Stable Diffusion (in-painting) folder as Flax modules + one param tree.

Folder layout (diffusers' `save_pretrained`): model_index.json, unet/, vae/, text_encoder/, tokenizer/,
scheduler/. Weights from *.safetensors or *.bin, converted by our own converter.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from synood_jax.models.checkpoint_io import CheckpointError
from synood_jax.diffusion import schedulers
from synood_jax.models import clip, unet as unet_lib, vae as vae_lib

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclasses.dataclass(frozen=True, eq=False)
class InpaintPipeline:
  """The static half of a pipeline (modules, scheduler, tokenizer); params travel separately."""
  unet: Any
  vae: Any
  text: Any            # a CLIP bundle of the text tower, without params (they travel in params['text'])
  scheduler: Any
  scaling_factor: float
  folder: str

  def __hash__(self):
    return id(self)

  def tokenize(self, texts) -> np.ndarray:
    return self.text.tokenize(list(texts))

  def text_hidden(self, text_params, ids):
    """Final-layer-normed last hidden states of the text encoder (what diffusers conditions on)."""
    return self.text.text_hidden_states(text_params, ids)

  def vae_encode(self, vae_params, images):
    return self.vae.apply({"params": vae_params}, images, method=self.vae.encode)

  def vae_decode(self, vae_params, latents):
    return self.vae.apply({"params": vae_params}, latents, method=self.vae.decode)


def load_inpaint_pipeline(folder: str, dtype=jnp.float32, scheduler: str | None = None):
  """-> (InpaintPipeline, params {'unet', 'vae', 'text'}). `scheduler` overrides the folder's class
  ('ddim', 'pndm', 'dpmsolver_multistep' or a diffusers class name); its config is always the folder's scheduler_config.json."""
  if not os.path.isfile(os.path.join(folder, "model_index.json")):
    raise CheckpointError(f"{folder}: no model_index.json: not a diffusers pipeline folder")
  for sub in SUBFOLDERS:
    if not os.path.isdir(os.path.join(folder, sub)):
      raise CheckpointError(f"{folder}: missing subfolder {sub!r} (a diffusers pipeline has {SUBFOLDERS})")
  unet_module, unet_params = unet_lib.from_pretrained(os.path.join(folder, "unet"), dtype=dtype)
  vae_module, vae_params = vae_lib.from_pretrained(os.path.join(folder, "vae"), dtype=dtype)
  text = clip.from_pretrained(os.path.join(folder, "text_encoder"), dtype=dtype,
                              tokenizer_path=os.path.join(folder, "tokenizer"))
  sched_cfg = schedulers.load_scheduler_config(os.path.join(folder, "scheduler"))
  # The bundle keeps no params of its own: once the caller shards params['text'], no unsharded copy
  # stays alive beside them.
  text, text_params = dataclasses.replace(text, params=None), text.params
  pipe = InpaintPipeline(unet=unet_module, vae=vae_module, text=text,
                         scheduler=schedulers.make_scheduler(sched_cfg, kind=scheduler),
                         scaling_factor=float(vae_module.cfg.scaling_factor),
                         folder=folder)
  return pipe, {"unet": unet_params, "vae": vae_params, "text": text_params}

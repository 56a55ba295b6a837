"""Tiny random CLIP checkpoints and a character-level CLIP tokenizer, for tests and demos.

Everything here is written with our own code (Flax init, safetensors), no torch and no download:
the folders are ordinary HF folders that transformers' CLIPModel / CLIPTokenizer load as well.
"""
from __future__ import annotations

import json
import os

from synood_jax import fileio
from synood_jax.models import checkpoint_io
from synood_jax.models import clip, clip_config

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# A couple of merges so the BPE path is exercised ("the" becomes one token); ids follow CLIP's layout:
# byte chars, their end-of-word forms, merge results, then the two special tokens (EOS is the largest id).
MERGES = (("t", "h"), ("th", "e</w>"))


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's reversible byte -> printable unicode char table (256 entries)."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:  # unprintable bytes are moved past 255, in order
      table[b] = chr(256 + extra)
      extra += 1
  return table


def char_vocab() -> dict[str, int]:
  chars = list(bytes_to_unicode().values())
  tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in MERGES] + [BOS, EOS]
  return {t: i for i, t in enumerate(tokens)}


def write_char_tokenizer(folder: str, context_length: int = 77) -> str:
  """Write vocab.json, merges.txt and tokenizer_config.json that `CLIPTokenizer.from_pretrained` loads."""
  fileio.write_json(os.path.join(folder, "vocab.json"), char_vocab(), ensure_ascii=False, indent=None)
  fileio.write_text(os.path.join(folder, "merges.txt"), "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
  fileio.write_json(os.path.join(folder, "tokenizer_config.json"),
                    {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length,
                     "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}, indent=2)
  return folder


def tiny_config(**overrides) -> clip_config.CLIPConfig:
  """A CLIPConfig with small towers; overrides are `vision_<field>`, `text_<field>` or top-level fields."""
  vocab = char_vocab()
  vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                hidden_act="quick_gelu", layer_norm_eps=1e-5, image_size=32, patch_size=8)
  text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              hidden_act="quick_gelu", layer_norm_eps=1e-5, vocab_size=len(vocab),
              max_position_embeddings=77, eos_token_id=vocab[EOS])
  top = dict(projection_dim=16)
  for key, value in overrides.items():
    if key.startswith("vision_"):
      vision[key[len("vision_"):]] = value
    elif key.startswith("text_"):
      text[key[len("text_"):]] = value
    elif key in ("projection_dim", "logit_scale_init_value"):
      top[key] = value
    else:
      raise ValueError(f"make_tiny_clip: unknown override {key!r} (use vision_*, text_* or projection_dim)")
  hf = {"model_type": "clip", "text_config": {"bos_token_id": vocab[BOS], "pad_token_id": vocab[EOS]}}
  return clip_config.CLIPConfig(clip_config.TowerConfig(**vision), clip_config.TowerConfig(**text), hf_json=json.dumps(hf), **top)


def write_preprocessor_config(folder: str, image_size: int) -> None:
  """CLIPImageProcessor settings scaled to the tiny image size (resize shortest side, centre crop)."""
  checkpoint_io.write_config(folder, {
      "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
      "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
      "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
      "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]},
      name="preprocessor_config.json")


def make_tiny_clip(folder: str, seed: int = 0, **config_overrides) -> str:
  """A random tiny CLIPModel folder (config, weights, char tokenizer, preprocessor config)."""
  config = tiny_config(**config_overrides)
  bundle = clip.create(config, seed=seed)
  clip.save_pretrained(bundle, folder)
  write_char_tokenizer(folder, config.text.max_position_embeddings)
  write_preprocessor_config(folder, config.vision.image_size)
  return folder


__all__ = ["write_char_tokenizer", "make_tiny_clip", "tiny_config", "char_vocab", "bytes_to_unicode"]

"""CLIP's configuration: transformers' config.json (a CLIPModel or one tower) read into hashable dataclasses
(static parts of jitted code) and written back, so a saved folder loads in transformers."""
from __future__ import annotations

import dataclasses
import json
from typing import Callable

import jax

from synood_jax.models.checkpoint_io import CheckpointError

# transformers' CLIPTextConfig / CLIPVisionConfig defaults: a config.json may leave any of them out.
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, projection_dim=512,
                     num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                     hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0,
                     initializer_range=0.02, initializer_factor=1.0, pad_token_id=1,
                     bos_token_id=49406, eos_token_id=49407, model_type="clip_text_model")
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, projection_dim=512, num_hidden_layers=12,
                       num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                       hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0,
                       initializer_range=0.02, initializer_factor=1.0, model_type="clip_vision_model")

ACTIVATIONS: dict[str, Callable] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch's default gelu is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  """The fields of one tower that shape the computation (hashable: a static part of jitted code)."""
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  hidden_act: str
  layer_norm_eps: float
  initializer_range: float = 0.02
  initializer_factor: float = 1.0
  # vision only
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  # text only
  vocab_size: int = 49408
  max_position_embeddings: int = 77
  eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  vision: TowerConfig | None
  text: TowerConfig | None
  projection_dim: int
  logit_scale_init_value: float = 2.6592
  hf_json: str = "{}"  # the config.json it came from, written back by save_pretrained
  projection: bool = True  # False: a bare CLIPTextModel / CLIPVisionModel (e.g. Stable Diffusion's text encoder)

  @property
  def hf(self) -> dict:
    return json.loads(self.hf_json)


def _square(value, name: str, source: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise CheckpointError(f"{source}: non-square {name} {value} is not supported")
    value = value[0]
  return int(value)


def _tower(raw: dict, defaults: dict, kind: str, source: str) -> TowerConfig:
  cfg = {**defaults, **raw}
  act = cfg["hidden_act"]
  if act not in ACTIVATIONS:
    raise CheckpointError(f"{source}: {kind} hidden_act {act!r} not supported (have {sorted(ACTIVATIONS)})")
  eos = cfg.get("eos_token_id", 49407)
  if isinstance(eos, (list, tuple)):  # transformers' pooling compares ids with one eos id
    raise CheckpointError(f"{source}: text eos_token_id must be one integer, got {eos}")
  if cfg["hidden_size"] % cfg["num_attention_heads"]:
    raise CheckpointError(f"{source}: {kind} hidden_size {cfg['hidden_size']} is not a multiple of "
                          f"num_attention_heads {cfg['num_attention_heads']}")
  return TowerConfig(
      hidden_size=int(cfg["hidden_size"]), intermediate_size=int(cfg["intermediate_size"]),
      num_hidden_layers=int(cfg["num_hidden_layers"]), num_attention_heads=int(cfg["num_attention_heads"]),
      hidden_act=act, layer_norm_eps=float(cfg["layer_norm_eps"]),
      initializer_range=float(cfg.get("initializer_range", 0.02)),
      initializer_factor=float(cfg.get("initializer_factor", 1.0)),
      num_channels=int(cfg.get("num_channels", 3)),
      image_size=_square(cfg.get("image_size", 224), "image_size", source),
      patch_size=_square(cfg.get("patch_size", 32), "patch_size", source),
      vocab_size=int(cfg.get("vocab_size", 49408)),
      max_position_embeddings=int(cfg.get("max_position_embeddings", 77)),
      eos_token_id=int(eos if eos is not None else 49407))


def config_from_hf(hf: dict, source: str = "config.json", projection: bool = True) -> CLIPConfig:
  """A CLIPModel (model_type clip) or one tower (clip_vision_model / clip_text_model), with its
  projection (CLIP*ModelWithProjection) or without (CLIP*Model: `projection=False`)."""
  kind = hf.get("model_type", "clip")
  dump = json.dumps(hf, sort_keys=True)
  if kind == "clip_vision_model":
    return CLIPConfig(_tower(hf, VISION_DEFAULTS, "vision", source), None,
                      int(hf.get("projection_dim", 512)), hf_json=dump, projection=projection)
  if kind == "clip_text_model":
    return CLIPConfig(None, _tower(hf, TEXT_DEFAULTS, "text", source),
                      int(hf.get("projection_dim", 512)), hf_json=dump, projection=projection)
  if kind != "clip":
    raise CheckpointError(f"{source}: model_type {kind!r} is not a CLIP model "
                          "(want clip, clip_vision_model or clip_text_model)")
  # Old configs carry *_config_dict beside *_config; transformers lets the former win.
  text = {**(hf.get("text_config") or {}), **(hf.get("text_config_dict") or {})}
  vision = {**(hf.get("vision_config") or {}), **(hf.get("vision_config_dict") or {})}
  return CLIPConfig(_tower(vision, VISION_DEFAULTS, "vision", source),
                    _tower(text, TEXT_DEFAULTS, "text", source),
                    int(hf.get("projection_dim", 512)),
                    float(hf.get("logit_scale_init_value", 2.6592)), hf_json=dump)


def to_hf_config(config: CLIPConfig) -> dict:
  """config.json for transformers: the original one if any, with our fields written over it."""
  hf = config.hf

  def tower(t: TowerConfig, base: dict, defaults: dict, vision: bool) -> dict:
    out = {**defaults, **base}
    keys = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
            "layer_norm_eps", "initializer_range", "initializer_factor"]
    keys += ["num_channels", "image_size", "patch_size"] if vision else [
        "vocab_size", "max_position_embeddings", "eos_token_id"]
    out.update({k: getattr(t, k) for k in keys})
    out["projection_dim"] = config.projection_dim
    for k in ("text_config_dict", "vision_config_dict", "transformers_version", "architectures", "dtype"):
      out.pop(k, None)
    return out

  if config.text is None:
    out = tower(config.vision, hf, VISION_DEFAULTS, True)
    out["architectures"] = ["CLIPVisionModelWithProjection" if config.projection else "CLIPVisionModel"]
  elif config.vision is None:
    out = tower(config.text, hf, TEXT_DEFAULTS, False)
    out["architectures"] = ["CLIPTextModelWithProjection" if config.projection else "CLIPTextModel"]
  else:
    out = {k: v for k, v in hf.items() if k not in ("text_config_dict", "vision_config_dict")}
    out.update(model_type="clip", architectures=["CLIPModel"], projection_dim=config.projection_dim,
               logit_scale_init_value=config.logit_scale_init_value,
               text_config=tower(config.text, {**(hf.get("text_config") or {}),
                                               **(hf.get("text_config_dict") or {})}, TEXT_DEFAULTS, False),
               vision_config=tower(config.vision, {**(hf.get("vision_config") or {}),
                                                   **(hf.get("vision_config_dict") or {})},
                                   VISION_DEFAULTS, True))
  out["dtype"] = "float32"
  return out

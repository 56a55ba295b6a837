"""Export and load a tuned SynOOD model: CLIP (HF format) + projection + negative features.

score(x) = NegLabel(normalize(f + P(f)), T_id, E)   with f = CLIP image embedding of x

Folder: clip/ (transformers loads it), projection.npz, negatives.npz (labels, prompts, features with the
tuned rows in place), id_text.npy + classnames.txt, synood.json (the score's settings, the ID prompt
templates, what produced it).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from synood_jax.data import datasets as data
from synood_jax.models import clip, zero_shot
from synood_jax.ood import evaluation, scores
from synood_jax.train import projection


@dataclasses.dataclass(frozen=True, eq=False)
class TunedModel:
  bundle: Any                     # CLIP
  projection: dict                # stage-2 params
  id_text: np.ndarray             # [C, D] normalised ID prompt features
  negatives: np.ndarray           # [M, D] normalised negative features (tuned rows replaced)
  negative_labels: list[str]
  classnames: list[str]
  groups: int = 100
  temperature: float = 0.01
  seed: int = 0                   # NegLabel's grouping permutation
  layernorm_eps: float = 1e-5
  normalize_inputs: bool = False
  templates: tuple[str, ...] = ("the nice {}",)  # the ID prompts `id_text` encodes

  def transform(self, raw_features):
    return projection.apply_projection(self.projection, raw_features, self.layernorm_eps, self.normalize_inputs)

  def score_features(self, raw_features):
    """Higher = more in-distribution, from raw CLIP image embeddings [N, D]."""
    return scores.neglabel_score(self.transform(raw_features), jnp.asarray(self.id_text),
                                 jnp.asarray(self.negatives), groups=self.groups, temperature=self.temperature,
                                 seed=self.seed)

  def score_images(self, images_nhwc, batch_size: int = 64):
    """Scores of CLIP-preprocessed NHWC images."""
    raw = zero_shot.image_features(self.bundle, self.bundle.params, images_nhwc, batch_size, normalize=False)
    return np.asarray(self.score_features(raw))

  def score_folder(self, folder: str, batch_size: int = 64, mesh=None) -> dict[str, float]:
    """{image path: score} for every readable image under `folder` (subfolders included), read and
    preprocessed as the CLIP folder says; unreadable files are logged and left out."""
    dataset = data.load_dataset(folder)
    feats = evaluation.encode_set(self.bundle, dataset, batch_size=batch_size, mesh=mesh)
    values = np.asarray(self.score_features(feats.features))
    return {dataset.records[i].path: float(v) for i, v in zip(feats.indices, values)}


def export_tuned(folder: str, model: TunedModel, negative_prompts: Sequence[str], info: dict) -> str:
  """Write `model` (and the prompts its negatives encode) as a folder `load_tuned` reads."""
  os.makedirs(folder, exist_ok=True)
  clip.save_pretrained(model.bundle, os.path.join(folder, "clip"))
  flat = traverse_util.flatten_dict(model.projection, sep="/")
  np.savez(os.path.join(folder, "projection.npz"), **{k: np.asarray(v) for k, v in flat.items()})
  np.savez(os.path.join(folder, "negatives.npz"), features=np.asarray(model.negatives, np.float32),
           labels=np.asarray(model.negative_labels), prompts=np.asarray(negative_prompts))
  np.save(os.path.join(folder, "id_text.npy"), np.asarray(model.id_text, np.float32))
  with open(os.path.join(folder, "classnames.txt"), "w") as f:
    f.write("\n".join(model.classnames) + "\n")
  settings = {k: getattr(model, k) for k in ("groups", "temperature", "seed", "layernorm_eps",
                                             "normalize_inputs")}
  with open(os.path.join(folder, "synood.json"), "w") as f:
    json.dump({**info, **settings, "templates": list(model.templates)}, f, indent=1, sort_keys=True)
  return folder


def load_tuned(folder: str) -> TunedModel:
  """Load what `export_tuned` wrote (errors name the missing file)."""
  for name in ("clip", "projection.npz", "negatives.npz", "id_text.npy", "classnames.txt", "synood.json"):
    if not os.path.exists(os.path.join(folder, name)):
      raise FileNotFoundError(f"{folder}: missing {name}: not a synood-jax export")
  with open(os.path.join(folder, "synood.json")) as f:
    info = json.load(f)
  with np.load(os.path.join(folder, "projection.npz")) as z:
    params = traverse_util.unflatten_dict({k: jnp.asarray(z[k]) for k in z.files}, sep="/")
  with np.load(os.path.join(folder, "negatives.npz")) as z:
    negatives, labels = z["features"], [str(x) for x in z["labels"]]
  with open(os.path.join(folder, "classnames.txt")) as f:
    classnames = [line.rstrip("\n") for line in f if line.strip()]
  return TunedModel(clip.from_pretrained(os.path.join(folder, "clip")), params,
                    np.load(os.path.join(folder, "id_text.npy")), negatives, labels, classnames,
                    groups=int(info["groups"]), temperature=float(info["temperature"]),
                    seed=int(info.get("seed", 0)), layernorm_eps=float(info["layernorm_eps"]),
                    normalize_inputs=bool(info["normalize_inputs"]),
                    templates=tuple(info.get("templates", TunedModel.templates)))

"""Export and load a tuned SynOOD model: CLIP (HF format) + projection + negative features.

score(x) = NegLabel(normalize(f + P(f)), T_id, E)   with f = CLIP image embedding of x

Folder: clip/ (transformers loads it), projection.npz, negatives.npz (labels, prompts, features with the
tuned rows in place), id_text.npy + classnames.txt, synood.json (what produced it).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from synood_jax import fileio
from synood_jax.train import projection
from synood_jax.ood import scores
from synood_jax.models import zero_shot
from synood_jax.models import clip


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
  layernorm_eps: float = 1e-5
  normalize_inputs: bool = False

  def transform(self, raw_features):
    return projection.apply_projection(self.projection, raw_features, self.layernorm_eps, self.normalize_inputs)

  def score_features(self, raw_features):
    """Higher = more in-distribution, from raw CLIP image embeddings [N, D]."""
    return scores.neglabel_score(self.transform(raw_features), jnp.asarray(self.id_text),
                                 jnp.asarray(self.negatives), groups=self.groups, temperature=self.temperature)

  def score_images(self, images_nhwc, batch_size: int = 64):
    """Scores of CLIP-preprocessed NHWC images."""
    raw = zero_shot.image_features(self.bundle, self.bundle.params, images_nhwc, batch_size, normalize=False)
    return np.asarray(self.score_features(raw))


def export_tuned(folder: str, bundle, projection: dict, id_text, negatives, negative_labels, negative_prompts,
                 classnames, info: dict) -> str:
  """Process 0 only (every file is shared)."""
  clip.save_pretrained(bundle, os.path.join(folder, "clip"))
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(projection, sep="/").items()}
  fileio.atomic_write(os.path.join(folder, "projection.npz"), lambda f: np.savez(f, **flat))
  fileio.atomic_write(os.path.join(folder, "negatives.npz"), lambda f: np.savez(
      f, features=np.asarray(negatives, np.float32), labels=np.asarray(negative_labels),
      prompts=np.asarray(negative_prompts)))
  fileio.atomic_write(os.path.join(folder, "id_text.npy"), lambda f: np.save(f, np.asarray(id_text, np.float32)))
  fileio.write_text(os.path.join(folder, "classnames.txt"), "\n".join(classnames) + "\n")
  fileio.write_json(os.path.join(folder, "synood.json"), info, indent=1, sort_keys=True)
  return folder


def load_tuned(folder: str) -> TunedModel:
  """Load what `export_tuned` wrote (errors name the missing file)."""
  for name in ("clip", "projection.npz", "negatives.npz", "id_text.npy", "classnames.txt", "synood.json"):
    if not os.path.exists(os.path.join(folder, name)):
      raise FileNotFoundError(f"{folder}: missing {name}: not a synood-jax export")
  with open(os.path.join(folder, "synood.json")) as f:
    info = json.load(f)
  with np.load(os.path.join(folder, "projection.npz")) as z:
    projection = traverse_util.unflatten_dict({k: jnp.asarray(z[k]) for k in z.files}, sep="/")
  with np.load(os.path.join(folder, "negatives.npz")) as z:
    negatives, labels = z["features"], [str(x) for x in z["labels"]]
  with open(os.path.join(folder, "classnames.txt")) as f:
    classnames = [line.rstrip("\n") for line in f if line.strip()]
  return TunedModel(clip.from_pretrained(os.path.join(folder, "clip")), projection,
                    np.load(os.path.join(folder, "id_text.npy")), negatives, labels, classnames,
                    groups=int(info["groups"]), temperature=float(info["temperature"]),
                    layernorm_eps=float(info["layernorm_eps"]), normalize_inputs=bool(info["normalize_inputs"]))

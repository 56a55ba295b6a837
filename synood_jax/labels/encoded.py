"""NegLabel's negative labels with their text features t_m = normalize(f_text('the nice {m}')), encoded
once per run (the evaluation and every pipeline stage read these, never encode them again)."""
from __future__ import annotations

import dataclasses
import io
from typing import Sequence

import numpy as np

from synood_jax import fileio
from synood_jax.labels import negative_labels as nl
from synood_jax.models import zero_shot


@dataclasses.dataclass(frozen=True)
class Negatives:
  """Negative labels (words, prompts, provenance) with their L2-normalised text features [M, D]."""
  labels: nl.NegativeLabels
  features: np.ndarray        # float32 [M, D]
  provenance: dict            # where the labels came from (`negative_labels.load_or_mine`)

  @property
  def words(self) -> list[str]:
    """The negative labels themselves, in feature-row order."""
    return list(self.labels.labels)

  @property
  def description(self) -> str:
    p, n = self.provenance, len(self.labels)
    if p.get("label_list"):
      return f"{n} from `{p['label_list']}`"
    if p.get("corpus"):
      return f"{n} mined from `{p['corpus']}` ({p.get('nouns')} nouns, {p.get('adjectives')} adjectives)"
    return f"{n} given by the caller"

  def save(self, label_list_path: str, features_path: str) -> None:
    """The label list (JSON, with provenance) and the features (npz with the prompts they encode)."""
    nl.write_label_list(label_list_path, self.labels, self.provenance)
    fileio.atomic_write(features_path, lambda f: np.savez(f, features=self.features,
                                                          prompts=np.asarray(self.labels.prompts)))

  @classmethod
  def load(cls, label_list_path: str, features_path: str) -> "Negatives":
    labels = nl.load_label_list(label_list_path)
    provenance = fileio.read_json(label_list_path).get("provenance", {})
    with fileio.open_file(features_path) as f, np.load(io.BytesIO(f.read())) as z:
      features, prompts = z["features"], [str(p) for p in z["prompts"]]
    if prompts != list(labels.prompts):
      raise ValueError(f"{features_path}: features of {len(prompts)} prompts, not of the "
                       f"{len(labels)} in {label_list_path}")
    return cls(labels, features, provenance)


def encode_negatives(bundle, classnames: Sequence[str], *, params=None, label_list: str = "",
                     corpus: str = "", percentile: float = 0.95, keep_fraction: float = 0.15,
                     batch_size: int = 1000, mesh=None) -> Negatives | None:
  """NegLabel's negatives (`negative_labels.load_or_mine`: a list, or mined from a corpus) and their
  features, each prompt encoded once; None when neither a list nor a corpus is given."""
  params = bundle.params if params is None else params
  # Through the module attribute: tests count the prompts a run encodes by patching it.
  encode = lambda prompts: zero_shot.encode_prompts(bundle, params, prompts, batch_size, mesh)
  found = nl.load_or_mine(encode, classnames, label_list=label_list, corpus=corpus, percentile=percentile,
                          keep_fraction=keep_fraction)
  if found is None:
    return None
  labels, provenance = found
  provenance = {**provenance, "model": bundle.folder}
  return Negatives(labels, encode(labels.prompts), provenance)

"""Every path of a SynOOD run, in one place: the stages, the report and the launchers all read it here.

<root>/
  models/{clip,sd}/            the demo's tiny random models (config.models.*_path empty)
  data/{train,val,ood,words}/  the demo's generated images and word lists
  sources.jsonl                stage `sources`
  synthesis/                   stage `synthesis`: <class>/<name>_ood.<ext> + manifest.jsonl
  synthesis_heldout/           the demo's synthetic images from held-out ID images
  negative_labels.json         stage `negatives`: the labels (and where they came from)
  negative_features.npz        stage `negatives`: their text features, the run's only encoding of them
  pseudo_labels.json, features.npz                    stage `features`
  stage2_projection/           stage `stage2`: checkpoints/, metrics.jsonl, run.json, projection.npz
  stage3_negatives/            stage `stage3`: checkpoints/, features/, tuned_negatives.npy
  export/                      stage `export`: the tuned model
  eval/                        stage `evaluate`: results.json, results.md, plots/, cache/
  report.md, report_grid.png, report_losses.png, report_scores.png   stage `report`
  config.json                  the full resolved config of the latest run, and the code version it ran
  run.lock (run.lease on gs://) the run holding the workdir now (or the last one): host, pid, start, command
  started/<stage>.json         the stage's fingerprint when it started (a killed stage resumes only if equal)
  done/<stage>.json            written last by each stage, with its fingerprint; a rerun skips the stage
                               while the config fields it reads (and its inputs) are unchanged
  rerun/                       a rerun of a finished stage writes its folders here and swaps them in at the
                               end (staging.py), so the finished outputs stay until the new ones are complete

The root may be a local or shared disk, or an object store URL (gs://bucket/run, where a GCS filesystem
for etils.epath is installed: gcsfs or tensorflow). Paths stay strings joined here; every read and
write of them goes through `synood_jax.fileio`. On several processes every one must see the same root.
"""
from __future__ import annotations

import dataclasses
import os


RERUN = "rerun"


def _at(*parts: str) -> property:
  """A path under the run's root (under <root>/rerun/ for the entries a staged rerun writes beside the
  finished ones), as a read-only attribute."""
  return property(lambda self: os.path.join(self.root, RERUN, *parts) if parts[0] in self.beside
                  else os.path.join(self.root, *parts))


@dataclasses.dataclass(frozen=True)
class Workdir:
  root: str
  beside: tuple[str, ...] = ()  # top-level entries this view places under <root>/rerun/ (staging.py)

  def path(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  def done(self, stage: str) -> str:
    return self.path("done", f"{stage}.json")

  def started(self, stage: str) -> str:
    return self.path("started", f"{stage}.json")

  config = _at("config.json")
  lock = _at("run.lock")      # lock.py: one run at a time
  lease = _at("run.lease")

  # Inputs the demo makes.
  models = _at("models")
  demo_clip = _at("models", "clip")
  demo_sd = _at("models", "sd")
  demo_data = _at("data")
  words = _at("data", "words")
  # Stage outputs, in stage order.
  sources = _at("sources.jsonl")
  synthesis = _at("synthesis")
  synthesis_manifest = _at("synthesis", "manifest.jsonl")
  synthesis_heldout = _at("synthesis_heldout")
  negative_labels = _at("negative_labels.json")
  negative_features = _at("negative_features.npz")
  pseudo_labels = _at("pseudo_labels.json")
  features = _at("features.npz")
  stage2 = _at("stage2_projection")
  projection = _at("stage2_projection", "projection.npz")
  stage3 = _at("stage3_negatives")
  tuned_negatives = _at("stage3_negatives", "tuned_negatives.npy")
  export = _at("export")
  eval = _at("eval")
  results = _at("eval", "results.json")
  results_md = _at("eval", "results.md")
  plots = _at("eval", "plots")
  report = _at("report.md")
  report_grid = _at("report_grid.png")
  report_losses = _at("report_losses.png")
  report_scores = _at("report_scores.png")

"""Every path of a SynOOD run, in one place: the stages, the report and the launchers all read it here.

<root>/
  models/{clip,sd}/            the demo's tiny random models (config.models.*_path empty)
  data/{train,val,ood,words}/  the demo's generated images and word lists
  sources.jsonl                stage `sources`
  synthesis/                   stage `synthesis`: <class>/<name>_ood.<ext> + manifest.jsonl
  synthesis_heldout/           the demo's synthetic images from held-out ID images
  negative_labels.json         stage `negatives`
  pseudo_labels.json, features.npz, classnames.txt    stage `features`
  stage2_projection/           stage `stage2`: checkpoints/, metrics.jsonl, run.json, projection.npz
  stage3_negatives/            stage `stage3`: checkpoints/, features/, tuned_negatives.npy
  export/                      stage `export`: the tuned model
  eval/                        stage `evaluate`: results.json, results.md, plots/, cache/
  report.md, report_grid.png   stage `report`
  config.json                  the full resolved config of the latest run
  started/<stage>.json         the stage's fingerprint when it started (a killed stage resumes only if equal)
  done/<stage>.json            written last by each stage, with its fingerprint; a rerun skips the stage
                               while the config fields it reads (and its inputs) are unchanged
"""
from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Workdir:
  root: str

  def path(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  # Inputs the demo makes.
  @property
  def models(self) -> str:
    return self.path("models")

  @property
  def demo_clip(self) -> str:
    return self.path("models", "clip")

  @property
  def demo_sd(self) -> str:
    return self.path("models", "sd")

  @property
  def demo_data(self) -> str:
    return self.path("data")

  @property
  def words(self) -> str:
    return self.path("data", "words")

  # Stage outputs.
  @property
  def sources(self) -> str:
    return self.path("sources.jsonl")

  @property
  def synthesis(self) -> str:
    return self.path("synthesis")

  @property
  def synthesis_manifest(self) -> str:
    return self.path("synthesis", "manifest.jsonl")

  @property
  def synthesis_heldout(self) -> str:
    return self.path("synthesis_heldout")

  @property
  def negative_labels(self) -> str:
    return self.path("negative_labels.json")

  @property
  def pseudo_labels(self) -> str:
    return self.path("pseudo_labels.json")

  @property
  def features(self) -> str:
    return self.path("features.npz")

  @property
  def classnames(self) -> str:
    return self.path("classnames.txt")

  @property
  def stage2(self) -> str:
    return self.path("stage2_projection")

  @property
  def projection(self) -> str:
    return self.path("stage2_projection", "projection.npz")

  @property
  def stage3(self) -> str:
    return self.path("stage3_negatives")

  @property
  def tuned_negatives(self) -> str:
    return self.path("stage3_negatives", "tuned_negatives.npy")

  @property
  def export(self) -> str:
    return self.path("export")

  @property
  def eval(self) -> str:
    return self.path("eval")

  @property
  def results(self) -> str:
    return self.path("eval", "results.json")

  @property
  def results_md(self) -> str:
    return self.path("eval", "results.md")

  @property
  def report(self) -> str:
    return self.path("report.md")

  @property
  def report_grid(self) -> str:
    return self.path("report_grid.png")

  @property
  def config(self) -> str:
    return self.path("config.json")

  def done(self, stage: str) -> str:
    return self.path("done", f"{stage}.json")

  def started(self, stage: str) -> str:
    return self.path("started", f"{stage}.json")

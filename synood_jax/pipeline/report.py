"""`report.md` of a whole SynOOD run: the results table, source vs synthetic images, ROC curves."""
from __future__ import annotations

import json
import os

import numpy as np

from synood_jax.ood.report import markdown, write_image_grid
from synood_jax.pipeline.workdir import Workdir


def results_section(wd: Workdir) -> str:
  """The part of the report a launcher prints: the results table."""
  with open(wd.results) as f:
    return markdown(json.load(f))


def write_run_report(wd: Workdir, max_pairs: int = 12) -> str:
  """Writes `wd.report` and returns its path."""
  with open(wd.synthesis_manifest) as f:
    manifest = [json.loads(line) for line in f]
  with open(wd.done("sources")) as f:
    source_root = json.load(f)["root"]
  step = max(1, len(manifest) // max_pairs)
  pairs = [(os.path.join(source_root, m["source"]), os.path.join(wd.synthesis, m["output"]))
           for m in manifest[::step][:max_pairs]]
  write_image_grid(pairs, wd.report_grid)
  scores = [m["scores"] for m in manifest]
  with open(wd.results) as f:
    results = json.load(f)
  lines = ["# SynOOD run report", "", results_section(wd), "",
           "## Synthesis", "",
           f"{len(manifest)} synthetic images; boundary score s per refinement iteration (mean over images): "
           + ", ".join(f"{v:.3f}" for v in np.mean(scores, axis=0)) + ".",
           f"{sum(m['stayed_in_distribution'] for m in manifest)} flagged as still in-distribution.", "",
           "Top row: sources; bottom row: their synthetic near-boundary OOD images.", "",
           f"![sources and synthetic images]({os.path.relpath(wd.report_grid, wd.root)})", "", "## ROC curves", ""]
  lines += [f"![ROC {s}]({os.path.relpath(os.path.join(wd.eval, 'plots', f'roc_{s}.png'), wd.root)})"
            for s in results["ood_sets"]]
  with open(wd.report, "w") as f:
    f.write("\n".join(lines) + "\n")
  return wd.report

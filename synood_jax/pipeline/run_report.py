"""`report.md` of a whole SynOOD run: what ran (models, classes, m, r, K), the results table (and where a
baseline beats the tuned model, why), the synthesis health, where the images' boundary scores landed
(s_0 and s_K histograms with -log C and m marked) and a source/synthetic grid covering every class, the
stage 2 and stage 3 loss curves, and links to the ROC curves and score histograms."""
from __future__ import annotations

import json
import os

import numpy as np

from synood_jax import fileio
from synood_jax.ood.results import (markdown, plot_boundary_scores, plot_loss_curves, pretty, set_label,
                                   write_image_grid)
from synood_jax.pipeline import code_version
from synood_jax.pipeline.workdir import Workdir
from synood_jax.synthesis import health

PAPER = "the paper's Table 1 (ViT-B/16): SynOOD 14.27 FPR95 / 97.01 AUROC, NegLabel 25.40 / 94.21, MCM 42.74 / 90.77"


def results_section(wd: Workdir) -> str:
  """The part of the report a launcher prints: the results table."""
  return markdown(fileio.read_json(wd.results))


def _read(path: str, default=None):
  return fileio.read_json(path) if fileio.exists(path) else default


def _jsonl(path: str) -> list[dict]:
  if not fileio.exists(path):
    return []
  return [json.loads(line) for line in fileio.read_text(path).splitlines() if line.strip()]


def setup_lines(config: dict, sources_info: dict) -> list[str]:
  """Models used, the classes, and the synthesis settings m, r, K."""
  m, s = config.get("models", {}), config.get("synthesis", {})
  random = not m.get("clip_path") or not m.get("sd_path")
  lines = ["## Setup", ""]
  if random:
    lines.append("- **Models: the demo's tiny random models** (CLIP and SD-2 in-painting made with random "
                 "weights by the `models` stage). They recognise nothing: the numbers below show that every "
                 "stage runs, not how well SynOOD works.")
  for key, what in (("clip_path", "CLIP"), ("sd_path", "SD-2 in-painting")):
    lines.append(f"- {what}: " + (f"`{m[key]}`" if m.get(key) else "random (tiny, made by the models stage)"))
  lines.append(f"- Code: {code_version.describe(config.get('code'))}")
  lines.append(f"- Guidance classifier: {s.get('classifier', '?')}" +
               (f" (`{s.get('resnet_path')}`)" if s.get("classifier") == "resnet50" else ""))
  if sources_info:
    lines.append(f"- ID classes: {sources_info.get('classes', '?')}" +
                 (" — **a subset**: each class keeps its index in the full label space"
                  if sources_info.get("subset") else ""))
  lines.append(f"- Boundary refinement: target m = {s.get('target')}, step size r = {s.get('step_size')}, "
               f"K = {s.get('iterations')} iterations, loss '{s.get('loss')}', band {s.get('band')} "
               f"(in_distribution: s_K below m* - band and below half way from s_0 to m* = min(m, -log C))")
  return lines + [""]


def baseline_note(results: dict, random_models: bool, tuned: str = "synood") -> list[str]:
  """Where a baseline row beats the tuned model (AUROC, ID positive), said plainly, and why it can."""
  methods = results.get("methods", {})
  if tuned not in methods:
    return []
  sets = list(results.get("ood_sets", [])) + ["average"]
  beats = []
  for method, by_conv in methods.items():
    if method == tuned:
      continue
    for name in sets:
      a = by_conv["id_positive"].get(name, {}).get("auroc")
      b = methods[tuned]["id_positive"].get(name, {}).get("auroc")
      if a is not None and b is not None and a > b:
        where = "average" if name == "average" else set_label(name, results.get("counts"))
        beats.append(f"{pretty(method)} beats {pretty(tuned)} on {where} (AUROC {100 * a:.2f} vs {100 * b:.2f})")
  if not beats:
    return [f"{pretty(tuned)} has the best AUROC on every set.", ""]
  why = ("With random models this is expected: their features carry no meaning, the tuned projection and "
         "negatives are fit to a few dozen synthetic images, and which score happens to separate the demo's "
         f"generated sets is close to chance. With the real models compare with {PAPER}."
         if random_models else
         "With real models this needs a look: check the synthesis statuses (how many images were ok), the "
         f"loss curves, and the negative labels. For reference, {PAPER}.")
  return ["**A baseline beats the tuned model:** " + "; ".join(beats) + ".", "", why, ""]


def pick_pairs(manifest: list[dict], max_pairs: int, target: float) -> list[dict]:
  """Up to max(max_pairs, classes) records covering every class: round-robin over the classes in
  class order, ok images first, nearest the boundary (|s - m|) first."""
  by_class: dict = {}
  for m in manifest:
    by_class.setdefault((m["class_index"], m["class_name"]), []).append(m)
  queues = [sorted(v, key=lambda m: (health.status_of(m) != "ok", abs(m["scores"][-1] - target)))
            for _, v in sorted(by_class.items())]
  out, depth = [], 0
  while len(out) < max(max_pairs, len(queues)) and any(depth < len(q) for q in queues):
    for q in queues:
      if depth < len(q) and len(out) < max(max_pairs, len(queues)):
        out.append(q[depth])
    depth += 1
  return sorted(out, key=lambda m: m["class_index"])


def score_lines(wd: Workdir, synthesis_cfg: dict, manifests: dict[str, list[dict]]) -> list[str]:
  """The picture of where each synthesis run's images landed (s_0 and s_K, with -log C, m and m* - band
  marked) and its caption; the class count C comes from the manifest (absent in older ones)."""
  runs = {name: tuple(np.asarray([m["scores"][k] for m in rows], np.float64) for k in (0, -1))
          for name, rows in manifests.items() if rows}
  if not runs:
    return []
  target, band = float(synthesis_cfg.get("target")), float(synthesis_cfg.get("band"))
  marks = {f"m = {target:g} (target)": target}
  lines = ["", "Where the images landed: the boundary score before refinement (s_0) and after it (s_K)."]
  c = next((m["num_classes"] for rows in manifests.values() for m in rows if "num_classes" in m), None)
  if c:
    loss = synthesis_cfg.get("loss", "squared")
    reach = health.reachable_target(target, c, loss)
    marks = {f"-log C = {health.highest_score(c):.3f} (highest s, C = {c})": health.highest_score(c), **marks,
             f"m* - band = {reach - band:.3f}": reach - band}
    warning = health.target_warning(target, c, loss)
    lines.append(f"Note: {warning}." if warning else f"m* = {reach:.3f} is within the classifier's range.")
  plot_boundary_scores(runs, wd.report_scores, marks)
  return lines + ["", f"![boundary scores s_0 and s_K]({os.path.relpath(wd.report_scores, wd.root)})"]


def _epoch_means(rows: list[dict]) -> list[float]:
  return [float(np.mean([r["loss"] for r in rows if r["epoch"] == e])) for e in sorted({r["epoch"] for r in rows})]


def write_run_report(wd: Workdir, max_pairs: int = 12) -> str:
  """Writes `wd.report` (and its grid and loss figures) and returns its path."""
  config = _read(wd.config, {})
  sources_info = _read(wd.done("sources"), {})
  synthesis_info = _read(wd.done("synthesis"), {})
  manifest = _jsonl(wd.synthesis_manifest)
  results = _read(wd.results)
  rel = lambda p: os.path.relpath(p, wd.root)
  random_models = not config.get("models", {}).get("clip_path") or not config.get("models", {}).get("sd_path")

  lines = ["# SynOOD run report", ""] + setup_lines(config, sources_info)
  lines += [results_section(wd), ""] + baseline_note(results, random_models,
                                                     config.get("eval", {}).get("tuned_method", "synood"))

  lines += ["## Synthesis", ""]
  skipped = sources_info.get("skipped") or []
  if skipped:  # counted in done/sources.json: said here too
    lines.append(f"{len(skipped)} training image(s) could not be read when the sources were selected and were "
                 "left out: " + ", ".join(f"`{x['path']}` ({x['reason']})" for x in skipped[:5])
                 + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "") + ".")
  statuses = health.counts([health.status_of(m) for m in manifest])
  drop = bool(config.get("pseudo", {}).get("drop_flagged"))
  lines.append(f"{len(manifest)} synthetic images: " + ", ".join(f"{k} {v}" for k, v in statuses.items())
               + f" (pseudo-labelled and trained on: {'ok' if drop else 'ok and in_distribution'} ones, "
               f"pseudo.drop_flagged={drop}; failed ones, nonfinite and degenerate, never).")
  held = synthesis_info.get("heldout")
  if held:
    lines.append(f"Held-out synthetic images (evaluation only): {held['images']}: "
                 + ", ".join(f"{k} {held['status'].get(k, 0)}" for k in health.STATUSES) + ".")
  unreadable = synthesis_info.get("unreadable_sources") or []
  if unreadable:
    lines.append(f"{len(unreadable)} source image(s) could not be read and were skipped: {unreadable[:5]}.")
  if manifest:
    scores = np.asarray([m["scores"] for m in manifest], np.float64)
    lines.append("Boundary score s per refinement iteration (mean over images): "
                 + ", ".join(f"{v:.3f}" for v in np.nanmean(scores, axis=0)) + ".")
    heldout = _jsonl(os.path.join(wd.synthesis_heldout, "manifest.jsonl"))
    lines += score_lines(wd, config.get("synthesis", {}), {"synthesis": manifest, "held-out synthesis": heldout})
    source_root = sources_info.get("root", "")
    chosen = pick_pairs(manifest, max_pairs, float(config.get("synthesis", {}).get("target", 0.0)))
    write_image_grid([(os.path.join(source_root, m["source"]), os.path.join(wd.synthesis, m["output"]))
                      for m in chosen], wd.report_grid,
                     captions=[f"{m['class_name'][:14]}: s = {m['scores'][-1]:.2f}"
                               + ("" if health.status_of(m) == "ok" else f" ({health.status_of(m)})")
                               for m in chosen])
    classes = len({m["class_index"] for m in manifest})
    lines += ["", f"Each pair: a source (left) and its synthetic near-boundary image (right) with its last score s; "
              f"{len(chosen)} pairs covering all {classes} classes.", "", f"![sources and synthetic images]({rel(wd.report_grid)})"]

  curves = {name: _jsonl(os.path.join(folder, "metrics.jsonl"))
            for name, folder in (("stage 2 (projection)", wd.stage2), ("stage 3 (negative features)", wd.stage3))}
  curves = {k: v for k, v in curves.items() if v}
  if curves:
    path = wd.report_losses
    plot_loss_curves(curves, path)
    lines += ["", "## Fine-tuning losses", ""]
    lines += [f"- {name}: epoch-mean loss {' → '.join(f'{v:.3f}' for v in _epoch_means(rows))}"
              for name, rows in curves.items()]
    lines += ["", f"![loss curves]({rel(path)})"]

  # Links only to plots that exist (eval.plots=False: the evaluate stage removed them).
  rocs = [(s, os.path.join(wd.plots, f"roc_{s}.png")) for s in results["ood_sets"]]
  rocs = [(s, p) for s, p in rocs if fileio.exists(p)]
  hists = [(m, os.path.join(wd.plots, f"hist_{m}.png")) for m in results["methods"]]
  hists = [(m, p) for m, p in hists if fileio.exists(p)]
  if rocs or hists:
    lines += ["", "## ROC curves and score histograms", ""]
    lines += [f"![ROC {s}]({rel(p)})" for s, p in rocs]
    lines += [""] + [f"- [{pretty(m)} score histogram]({rel(p)})" for m, p in hists]
  fileio.write_text(wd.report, "\n".join(lines) + "\n")
  return wd.report

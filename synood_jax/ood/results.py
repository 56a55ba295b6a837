"""Result tables (Markdown, shaped like the papers' Table 1) and plots (ROC curves, score histograms).

Results follow the layout `evaluation.evaluate` writes to results.json:
  results["methods"][method][convention][ood_set] = {fpr95, auroc, aupr_in, aupr_out}   (fractions)
  results["methods"][method][convention]["average"] = the same keys, mean over the OOD sets
  results["ood_sets"] = ordered OOD set names; results["header"] = what produced the numbers (each
  method's prompt templates, the FPR95 operating-point rule of each convention, ...).
Tables print percentages with two decimals, as the papers do.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from synood_jax import decode, fileio, parallel
from synood_jax.ood import metrics

PRETTY = {"inaturalist": "iNaturalist", "sun": "SUN", "places": "Places", "textures": "Textures",
          "mcm": "MCM", "neglabel": "NegLabel", "synood": "SynOOD"}
CONVENTION_TEXT = {
    "id_positive": "ID positive (MOS / MCM / NegLabel): FPR95 = share of OOD accepted at 95% ID recall",
    "ood_positive": "OOD positive (OpenOOD v1.5): FPR95 = share of ID rejected at 95% OOD recall",
}


def convention_heading(convention: str, rule: str | None) -> list[str]:
  """The table's heading lines: the convention, and the operating-point rule its FPR95 used."""
  lines = [f"## {CONVENTION_TEXT.get(convention, convention)}", ""]
  if rule is not None:
    lines += [f"FPR95 operating point '{rule}': {metrics.RULE_TEXT.get(rule, rule)}.", ""]
  return lines


def pretty(name: str) -> str:
  return PRETTY.get(name.lower(), name)


def partial(name: str, counts: Mapping | None) -> tuple[int, int] | None:
  """(found, expected) when the set has fewer images than the full set it is named after, else None."""
  c = (counts or {}).get(name) or {}
  found, expected = c.get("found"), c.get("expected")
  return (found, expected) if found is not None and expected and found < expected else None


def set_label(name: str, counts: Mapping | None = None) -> str:
  """The set's display name; a partial set says so: 'SUN (8 of 10,000)'."""
  p = partial(name, counts)
  return f"{pretty(name)} ({p[0]:,} of {p[1]:,})" if p else pretty(name)


def _set_count(name: str, n, counts: Mapping | None) -> str:
  p = partial(name, counts)
  return f"`{name}` ({p[0]:,} of {p[1]:,} images: **partial**)" if p else f"`{name}` ({n})"


def _pct(x) -> str:
  return "-" if x is None or not np.isfinite(x) else f"{100 * float(x):.2f}"


def metrics_table(results: Mapping, convention: str = "id_positive",
                  columns: Sequence[str] = ("fpr95", "auroc")) -> str:
  """Rows = methods; columns = each OOD set's metrics, then Average (Markdown)."""
  sets = list(results["ood_sets"]) + ["average"]
  arrows = {"fpr95": "FPR95↓", "auroc": "AUROC↑", "aupr_in": "AUPR-In↑", "aupr_out": "AUPR-Out↑"}
  counts = results.get("counts")
  head = ["Method"] + [f"{'Average' if s == 'average' else set_label(s, counts)} {arrows[c]}"
                       for s in sets for c in columns]
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] + [":---:"] * (len(head) - 1)) + "|"]
  for method, by_conv in results["methods"].items():
    row = [pretty(method)]
    for s in sets:
      m = by_conv[convention].get(s, {})
      row += [_pct(m.get(c)) for c in columns]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def markdown(results: Mapping) -> str:
  """The whole results.md: a header saying what produced the numbers, then one table per convention."""
  h = results.get("header", {})
  out = ["# OOD detection results", ""]
  out.append(f"- Model: `{h.get('model', '?')}` ({h.get('dtype', '?')})")
  counts = results.get("counts")
  out.append(f"- ID set: {_set_count(h.get('id_set', '?'), h.get('id_count', '?'), counts)}; OOD sets: "
             + ", ".join(_set_count(s, n, counts) for s, n in h.get("ood_counts", {}).items()))
  out.append(f"- Class names: {h.get('classnames', '?')} ({h.get('num_classes', '?')} classes)")
  templates = h.get("templates", [])
  if isinstance(templates, dict):  # each method's own ID prompts
    out.append("- Prompt templates: " + "; ".join(
        f"{pretty(m)} {', '.join(repr(t) for t in ts)}" for m, ts in templates.items()))
  else:
    out.append(f"- Prompt templates: {', '.join(repr(t) for t in templates)}")
  if h.get("negatives"):
    out.append(f"- Negative labels: {h['negatives']}")
  methods = set(results.get("methods", {}))
  if h.get("groups") is not None and methods - {"mcm"}:  # NegLabel's settings, only with a NegLabel-style row
    out.append(f"- NegLabel groups: {h['groups']}, temperature {h.get('temperature')}, seed {h.get('seed')}")
  if "mcm" in methods and h.get("mcm_temperature") is not None:
    out.append(f"- MCM temperature: {h['mcm_temperature']}")
  if h.get("preprocess"):
    out.append(f"- Preprocessing: {h['preprocess']}")
  accuracy = {m: a for m, a in (results.get("id_accuracy") or {}).items() if a is not None}
  if accuracy:
    out.append("- Zero-shot ID top-1 accuracy: " + ", ".join(
        f"{_pct(a)}% with {pretty(m)}'s prompts" for m, a in accuracy.items()))
  failures = results.get("failures", {})
  n_fail = sum(len(v) for v in failures.values())
  out.append(f"- Unreadable images left out: {n_fail}" + (" (listed in results.json)" if n_fail else ""))
  out.append("")
  rules = h.get("fpr95_rules", {})
  conventions = results.get("conventions", list(metrics.CONVENTIONS))
  for convention in conventions:
    out += convention_heading(convention, rules.get(convention)) + [metrics_table(results, convention), ""]
  out += ["AUPR (average precision; the same in both conventions):", "",
          metrics_table(results, conventions[0], ("aupr_in", "aupr_out")), ""]
  return "\n".join(out)


def write_markdown(results: Mapping, path: str) -> str:
  fileio.write_text(path, markdown(results))
  return path


# ------------------------------------------------------------------------------------------------
# Plots.

def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(plt, fig, path: str, dpi: int) -> None:
  """A finished figure as a PNG (written atomically by process 0), then freed."""
  fig.tight_layout()
  fileio.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
  plt.close(fig)


def plot_roc(id_scores: Mapping[str, np.ndarray], ood_scores: Mapping[str, np.ndarray], path: str,
             title: str = "", convention: str = "id_positive") -> str:
  """One ROC plot: a curve per method. id_scores / ood_scores: method -> scores for one OOD set."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(4.5, 4.5))
  for method, s_id in id_scores.items():
    fpr, tpr, _ = metrics.roc_points(s_id, ood_scores[method], convention)
    auc = metrics.auroc(s_id, ood_scores[method])
    ax.plot(fpr, tpr, label=f"{pretty(method)} (AUROC {100 * auc:.2f})", lw=1.5)
  ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
  ax.axhline(0.95, color="0.6", lw=0.6, ls=":")
  pos = "ID" if convention == "id_positive" else "OOD"
  ax.set_xlabel("false positive rate")
  ax.set_ylabel(f"true positive rate ({pos} positive)")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.01)
  ax.set_title(title)
  ax.legend(loc="lower right", fontsize=8)
  _save(plt, fig, path, dpi=120)
  return path


def plot_histograms(id_scores: np.ndarray, ood_scores: Mapping[str, np.ndarray], path: str,
                    title: str = "", bins: int = 60) -> str:
  """Score histograms of the ID set and each OOD set (density, shared bins) for one method."""
  plt = _pyplot()
  all_scores = np.concatenate([np.ravel(id_scores)] + [np.ravel(s) for s in ood_scores.values()])
  lo, hi = float(np.min(all_scores)), float(np.max(all_scores))
  edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.hist(np.ravel(id_scores), bins=edges, density=True, alpha=0.55, label="ID", color="C0")
  for k, (name, s) in enumerate(ood_scores.items()):
    ax.hist(np.ravel(s), bins=edges, density=True, histtype="step", lw=1.5, label=pretty(name),
            color=f"C{k + 1}")
  ax.set_xlabel("score (higher = ID)")
  ax.set_ylabel("density")
  ax.set_title(title)
  ax.legend(fontsize=8)
  _save(plt, fig, path, dpi=120)
  return path


def write_plots(scores: Mapping[str, Mapping[str, np.ndarray]], id_set: str, ood_sets: Sequence[str],
                out_dir: str, convention: str = "id_positive", counts: Mapping | None = None) -> list[str]:
  """scores[method][set] -> `roc_<set>.png` per OOD set and `hist_<method>.png` per method; partial
  sets (`counts`) are named as such in titles and legends."""
  label = lambda s: set_label(s, counts)
  paths = []
  for s in ood_sets:
    paths.append(plot_roc({m: v[id_set] for m, v in scores.items()}, {m: v[s] for m, v in scores.items()},
                          os.path.join(out_dir, f"roc_{s}.png"), f"ROC: {label(id_set)} vs {label(s)}", convention))
  for m, v in scores.items():
    paths.append(plot_histograms(v[id_set], {label(s): v[s] for s in ood_sets},
                                 os.path.join(out_dir, f"hist_{m}.png"), f"{pretty(m)} scores"))
  return paths


def write_image_grid(pairs: Sequence[tuple[str, str]], path: str, size: int = 96,
                     captions: Sequence[str] | None = None, per_row: int = 4) -> str:
  """Pairs side by side (source left, synthetic right), `per_row` pairs a row, each with an optional
  caption strip below (PNG)."""
  from PIL import Image, ImageDraw
  n = len(pairs)
  cols = max(1, min(per_row, n))
  rows = max(1, parallel.ceil_div(n, cols))
  strip = 14 if captions else 0
  gap = 6
  cell_w, cell_h = 2 * size + gap, size + strip + gap
  grid = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
  draw = ImageDraw.Draw(grid)
  for i, (src, syn) in enumerate(pairs):
    x, y = (i % cols) * cell_w, (i // cols) * cell_h
    for k, p in enumerate((src, syn)):
      with fileio.open_file(p) as f, Image.open(f) as im:
        grid.paste(decode.to_rgb(im).resize((size, size), Image.BICUBIC), (x + k * size, y))
    if captions:
      draw.text((x + 2, y + size + 1), captions[i], fill="black")
  fileio.atomic_write(path, lambda f: grid.save(f, format="PNG"))
  return path


def plot_loss_curves(curves: Mapping[str, Sequence[Mapping]], path: str) -> str:
  """Training loss per step (thin) and per-epoch mean (markers), one panel per curve; rows are
  metrics.jsonl records {step, epoch, loss}."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
  for ax, (name, rows) in zip(axes[0], curves.items()):
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8, alpha=0.6, label="per step")
    epochs = sorted({r["epoch"] for r in rows})
    ends = [max(r["step"] for r in rows if r["epoch"] == e) for e in epochs]
    means = [np.mean([r["loss"] for r in rows if r["epoch"] == e]) for e in epochs]
    ax.plot(ends, means, "o-", lw=1.5, label="epoch mean")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(name)
    ax.legend(fontsize=8)
  _save(plt, fig, path, dpi=110)
  return path


def plot_boundary_scores(runs: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str,
                         marks: Mapping[str, float], bins: int = 40) -> str:
  """Where synthetic images landed: histograms of the boundary score before refinement (s_0) and after
  it (s_K), one panel per synthesis run {name: (s_0, s_K)}, with a vertical line per mark {label: s}.
  Non-finite scores are left out; the shared range includes the marks, so every line shows."""
  plt = _pyplot()
  finite = lambda v: np.asarray(v, np.float64)[np.isfinite(v)]
  values = np.concatenate([finite(v) for pair in runs.values() for v in pair] + [finite(list(marks.values()))])
  lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
  edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
  fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.6), squeeze=False)
  for ax, (name, (first, last)) in zip(axes[0], runs.items()):
    ax.hist(finite(first), bins=edges, alpha=0.5, color="C0", label="s_0 (before refinement)")
    ax.hist(finite(last), bins=edges, alpha=0.5, color="C1", label="s_K (after refinement)")
    for k, (label, x) in enumerate(marks.items()):
      ax.axvline(x, color=f"C{k + 2}", lw=1.2, ls=("-", "--", ":")[k % 3], label=label)
    ax.set_xlabel("boundary score s = mean(g) - logsumexp(g)")
    ax.set_ylabel("images")
    ax.set_title(f"{name} ({len(first)} images)")
    ax.legend(fontsize=7)
  _save(plt, fig, path, dpi=110)
  return path

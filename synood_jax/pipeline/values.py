"""The config's values, checked before any stage runs: one error lists every bad field.

`inputs.py` checks the paths; this checks the rest: every number finite, every enum-like field one of
its names, every number in its range. Before, `synthesis.step_size=-inf` deleted the previous good
synthesis before the health check stopped the run, and `synthesis.classifier=clipp` was found after
three stages had run. The names come from the modules that use them, so the two cannot disagree.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from synood_jax.models import attention
from synood_jax.ood import evaluation, metrics
from synood_jax.pipeline import provenance
from synood_jax.diffusion import schedulers
from synood_jax.synthesis import guidance, manifest, refinement

DTYPES = ("float32", "bfloat16", "float16")
CONTEXT_POLICIES = ("skip", "fallback")
VERIFY = ("exists", "header", "decode")


class ConfigValueError(ValueError):
  """Config values that are not finite, not a known name, or out of range; the message lists each."""


ENUMS: dict[str, tuple] = {
    "on_change": provenance.ON_CHANGE,
    "models.dtype": DTYPES,
    "models.attention": attention.CHOICES,
    "context.policy": CONTEXT_POLICIES,
    "synthesis.classifier": tuple(guidance.CLASSIFIERS),
    "synthesis.loss": refinement.LOSSES,
    "synthesis.grad_mode": refinement.GRAD_MODES,
    "synthesis.image_format": tuple(manifest.IMAGE_FORMATS),
    "synthesis.scheduler": ("", *schedulers.NAMES),  # '' = the folder's
    "eval.verify": VERIFY,
    "eval.fpr95_rules.id_positive": metrics.FPR_RULES,
    "eval.fpr95_rules.ood_positive": metrics.FPR_RULES,
}

_pos = (lambda v: v > 0, "> 0")
_nonneg = (lambda v: v >= 0, ">= 0")
_unit = (lambda v: 0 < v <= 1, "in (0, 1]")
_share = (lambda v: 0 <= v <= 1, "in [0, 1]")
_beta = (lambda v: 0 <= v < 1, "in [0, 1)")
_count = (lambda v: v >= 1 and float(v).is_integer(), "a whole number >= 1")
_whole = (lambda v: v >= 0 and float(v).is_integer(), "a whole number >= 0")
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "synthesis.image_size": (lambda v: v >= 8 and v % 8 == 0, "a multiple of 8 (the VAE's factor)"),
    "synthesis.steps": _count, "synthesis.strength": _unit, "synthesis.iterations": _count,
    "synthesis.step_size": _nonneg, "synthesis.guidance_scale": _nonneg, "synthesis.band": _nonneg,
    "synthesis.max_not_ok": _share, "synthesis.min_pixel_std": _nonneg, "synthesis.batch_size": _count,
    "synthesis.decode_chunk": _whole, "synthesis.reference_batch": _count,
    "synthesis.jpeg_quality": (lambda v: 1 <= v <= 100, "in [1, 100]"), "synthesis.clip_logit_scale": _pos,
    "synthesis.log_every_secs": _pos, "sources.per_class": _count, "context.max_chars": _count,
    "negatives.percentile": _unit, "negatives.keep_fraction": _unit,
    "eval.groups": _count, "eval.temperature": _pos, "eval.mcm_temperature": _pos, "eval.batch_size": _count,
    "eval.text_batch_size": _count, "eval.score_batch_size": _count, "eval.num_threads": _whole,
    "stage2.b1": _beta, "stage2.b2": _beta, "stage2.eps": _pos, "stage2.layernorm_eps": _pos,
    "stage3.momentum": _beta, "stage3.keep_epoch": _whole,
}
for _stage in ("stage2", "stage3"):
  RANGES.update({f"{_stage}.epochs": _count, f"{_stage}.lr": _pos, f"{_stage}.eta_min": _nonneg,
                 f"{_stage}.batch_size": _count, f"{_stage}.weight_decay": _nonneg, f"{_stage}.logit_scale": _pos,
                 f"{_stage}.checkpoint_every": _count, f"{_stage}.max_to_keep": _count,
                 f"{_stage}.progress_every_secs": _pos})


def _leaves(node: Any, prefix: str = ""):
  if hasattr(node, "items"):
    for k, v in node.items():
      yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
  elif isinstance(node, (list, tuple)):
    for i, v in enumerate(node):
      yield from _leaves(v, f"{prefix}[{i}]")
  else:
    yield prefix, node


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "items") or part not in node:
      return None, False
    node = node[part]
  return node, True


def problems(config) -> list[str]:
  """Every bad value as 'field=value: why': non-finite numbers (in the config's key order), then unknown
  names, then ranges (empty when all are fine)."""
  out = []
  for field, value in _leaves(config):  # finite numbers everywhere (bool is an int: skipped)
    if isinstance(value, float) and not math.isfinite(value):
      out.append(f"{field}={value!r}: not a finite number")
  bad = {line.split("=", 1)[0] for line in out}
  for field, names in ENUMS.items():
    value, found = _get(config, field)
    if found and value not in names:
      out.append(f"{field}={value!r}: not one of {', '.join(repr(n) for n in names)}")
  for field, (ok, text) in RANGES.items():
    value, found = _get(config, field)
    if not found or value is None or field in bad or isinstance(value, bool):
      continue
    if not isinstance(value, (int, float)):
      out.append(f"{field}={value!r}: not a number (want {text})")
    elif not ok(value):
      out.append(f"{field}={value!r}: want {text}")
  epochs, keep = config.get("stage3", {}).get("epochs"), config.get("stage3", {}).get("keep_epoch")
  if isinstance(epochs, int) and isinstance(keep, int) and keep > epochs:
    out.append(f"stage3.keep_epoch={keep}: more than stage3.epochs={epochs}")
  if "eval" in config and not any(line.startswith("eval.") for line in out):  # its own checks, not twice
    try:
      evaluation.Options.from_config(config.eval)
    except (ValueError, TypeError) as e:
      out.append(str(e))
  return out


def validate(config) -> None:
  """Raise ConfigValueError listing every bad value (before any stage runs, before any output is touched)."""
  bad = problems(config)
  if bad:
    raise ConfigValueError(f"{len(bad)} config value(s) are invalid (checked before any stage runs; nothing "
                           "was changed in the workdir):\n" + "\n".join(f"  config.{line}" for line in bad))

"""Every path the config names, checked before the first stage runs: one error lists all that is missing.

A typo in `models.sd_path` should not surface hours later, after the sources stage has scanned 1.28M
image headers. Only paths that a stage of this run reads are checked (a rerun of `report` alone does
not need the SD folder), and model folders are checked for the files their loaders open first.
"""
from __future__ import annotations

import os
from typing import Iterable

from synood_jax.data import imagenet
from synood_jax.diffusion import inpaint_pipeline as sd_pipeline
from synood_jax.models import checkpoint_io, clip
from synood_jax.ood import evaluation

CLIP_STAGES = ("synthesis", "negatives", "features", "stage2", "stage3", "export", "evaluate")


class InputError(ValueError):
  """Paths named by the config that are missing or incomplete; the message lists every one."""


def _model_folder(path: str, config_name: str = "config.json") -> list[str]:
  if not os.path.isdir(path):
    return ["no such folder"]
  problems = []
  if not os.path.isfile(os.path.join(path, config_name)):
    problems.append(f"no {config_name}")
  try:
    checkpoint_io.weight_files(path)
  except checkpoint_io.CheckpointError:
    problems.append(f"no weight file ({', '.join(checkpoint_io.WEIGHT_FILES)})")
  return problems


def clip_folder(path: str) -> list[str]:
  """Problems of a HF CLIP folder (empty when it looks loadable)."""
  problems = _model_folder(path)
  if os.path.isdir(path) and not clip.has_tokenizer(path):
    problems.append("no tokenizer (vocab.json + merges.txt or tokenizer.json)")
  return problems


def sd_folder(path: str) -> list[str]:
  """Problems of a diffusers SD in-painting folder (empty when it looks loadable)."""
  if not os.path.isdir(path):
    return ["no such folder"]
  problems = [] if os.path.isfile(os.path.join(path, "model_index.json")) else ["no model_index.json"]
  for sub in sd_pipeline.SUBFOLDERS:
    folder = os.path.join(path, sub)
    if not os.path.isdir(folder):
      problems.append(f"no {sub}/")
    elif sub in ("unet", "vae", "text_encoder"):
      problems += [f"{sub}/: {p}" for p in _model_folder(folder)]
    elif sub == "tokenizer" and not clip.has_tokenizer(folder):
      problems.append("tokenizer/: no vocab.json or tokenizer.json")
    elif sub == "scheduler" and not os.path.isfile(os.path.join(folder, "scheduler_config.json")):
      problems.append("scheduler/: no scheduler_config.json")
  return problems


def _file(path: str) -> list[str]:
  return [] if os.path.isfile(path) else ["no such file"]


def _folder(path: str) -> list[str]:
  return [] if os.path.isdir(path) else ["no such folder"]


def _corpus(spec: str) -> list[str]:
  if "," in spec:
    return [f"{p.strip()}: no such file" for p in spec.split(",", 1) if not os.path.isfile(p.strip())]
  return _folder(spec)


def _classnames(spec) -> list[str]:
  if not isinstance(spec, str) or spec == "folders" or spec.lower() in imagenet.BUILTIN:
    return []
  return _file(spec)


def _eval_set(spec: str) -> list[str]:
  if spec.startswith("tfds:"):
    return []
  if spec.startswith("list:"):
    _, list_path, root = spec.split(":", 2)
    return [f"{p}: {q}" for p, check in ((list_path, _file), (root, _folder)) for q in check(p)]
  return [] if os.path.exists(spec) else ["no such file or folder"]


def checks(config, stages: Iterable[str]) -> list[tuple[str, str, list[str]]]:
  """[(field, path, problems)] for the paths the given stages read."""
  stages = set(stages)
  c, out = config, []

  def check(field: str, path: str, fn, used_by: Iterable[str]):
    if path and stages & set(used_by):
      out.append((field, path, fn(path)))

  generated = bool(c.data.get("generate"))
  # Synthesis loads CLIP only as its guidance classifier; with the ResNet-50 it needs no CLIP folder.
  clip_users = [s for s in CLIP_STAGES if s != "synthesis" or c.synthesis.classifier == "clip"]
  check("models.clip_path", c.models.clip_path, clip_folder, clip_users)
  check("models.sd_path", c.models.sd_path, sd_folder, ("synthesis",))
  if not generated:
    check("data.train_root", c.data.train_root, _folder, ("sources", "synthesis", "features"))
  else:  # the demo writes its generated images in the workdir only, never into a folder of the user's
    for key in ("train_root", "val_root"):
      check(f"data.{key}", c.data.get(key), lambda _: [
          "set together with data.generate: the demo generates its images in <workdir>/data and never "
          "writes into your folders; to use your images, take a config without data.generate "
          "(configs/imagenet_vitb16.py)"], ("data", "sources", "synthesis", "features", "evaluate"))
  check("data.classnames", c.data.classnames, _classnames, ("sources",) + CLIP_STAGES)
  check("context.answers_file", c.context.answers_file, _file, ("synthesis",))
  if c.synthesis.classifier == "resnet50":
    if not c.synthesis.resnet_path and "synthesis" in stages:
      out.append(("synthesis.resnet_path", "", ["empty, but synthesis.classifier='resnet50' needs it"]))
    check("synthesis.resnet_path", c.synthesis.resnet_path, _file, ("synthesis",))
  check("negatives.label_list", c.negatives.label_list, _file, ("negatives",))
  if not c.negatives.label_list:
    check("negatives.corpus", c.negatives.corpus, _corpus, ("negatives",))
  if not generated and "evaluate" in stages:
    for key in ("id_set", "ood_sets"):
      try:
        sets = evaluation.parse_sets(c.eval[key], c.eval.get("data_dir", ""))
      except ValueError as e:
        out.append((f"eval.{key}", str(c.eval[key]), [str(e)]))
        continue
      for name, spec in sets.items():
        check(f"eval.{key}[{name}]", spec, _eval_set, ("evaluate",))
  return out


def validate(config, stages: Iterable[str]) -> None:
  """Raise InputError listing every missing or incomplete path the given stages read."""
  bad = [(f, p, probs) for f, p, probs in checks(config, stages) if probs]
  if bad:
    lines = [f"  {field}={path!r}: {'; '.join(probs)}" for field, path, probs in bad]
    raise InputError(f"{len(bad)} path(s) named by the config are missing or incomplete (checked before any "
                     "stage runs):\n" + "\n".join(lines))

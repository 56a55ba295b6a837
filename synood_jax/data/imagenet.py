"""ImageNet-1k class names as CLIP cleaned them, and a loader for class-name lists.

`IMAGENET_CLASSES` (the data file `imagenet_classes.txt` beside this module) are the 1000 names of
CLIP's `notebooks/Prompt_Engineering_for_ImageNet.ipynb` (`imagenet_data.json`), in label order (index = ImageNet class id, WordNet-id sorted), the list MCM and
NegLabel prompt with. It keeps CLIP's two duplicates ('missile' at 657 and 744, 'sunglasses' at 836 and
837). `IMAGENET_TEMPLATES` (`imagenet_templates.txt`) are that notebook's 80 prompt templates.
"""
from __future__ import annotations

import json
import os
from importlib import resources
from typing import Sequence


def _data_lines(name: str) -> tuple[str, ...]:
  return tuple(resources.files(__package__).joinpath(name).read_text(encoding="utf-8").splitlines())


IMAGENET_CLASSES: tuple[str, ...] = _data_lines("imagenet_classes.txt")
IMAGENET_TEMPLATES: tuple[str, ...] = _data_lines("imagenet_templates.txt")

# Prompt templates by name (the config's `templates` field takes a name or a list of templates).
TEMPLATES = {
    "neglabel": ("the nice {}",),   # NegLabel / SynOOD: ID classes and nouns
    "mcm": ("a photo of a {}",),    # MCM (no period: MCM's `prompt_name`)
    "clip80": IMAGENET_TEMPLATES,   # CLIP's 80-template ensemble
}

BUILTIN = {"imagenet": IMAGENET_CLASSES, "imagenet1k": IMAGENET_CLASSES, "imagenet_clip": IMAGENET_CLASSES}


def load_classnames(source: str | Sequence[str]) -> list[str]:
  """Class names from a builtin name ('imagenet'), a file, or a list (returned as a list).

  Files: `.json` (a list, or a dict with 'classes' / 'imagenet_classes'), otherwise one name per line
  (blank lines skipped; the whole stripped line is the name).
  """
  if not isinstance(source, str):
    names = [str(s) for s in source]
  elif source.lower() in BUILTIN:
    names = list(BUILTIN[source.lower()])
  elif os.path.exists(source):
    with open(source, encoding="utf-8") as f:
      text = f.read()
    if source.endswith(".json"):
      data = json.loads(text)
      if isinstance(data, dict):
        for key in ("classes", "imagenet_classes", "classnames"):
          if key in data:
            data = data[key]
            break
        else:
          raise ValueError(f"{source}: a JSON dict needs a 'classes' or 'imagenet_classes' key")
      names = [str(s) for s in data]
    else:
      names = [line.strip() for line in text.splitlines() if line.strip()]
  else:
    raise ValueError(f"class names {source!r}: neither a builtin ({sorted(BUILTIN)}) nor a file")
  if not names:
    raise ValueError(f"class names {source!r}: empty")
  return names


def load_templates(source: str | Sequence[str]) -> list[str]:
  """Prompt templates from a name in TEMPLATES, a single template containing '{}', or a list."""
  if isinstance(source, str):
    if source in TEMPLATES:
      return list(TEMPLATES[source])
    source = [source]
  templates = [str(t) for t in source]
  for t in templates:
    if "{}" not in t:
      raise ValueError(f"prompt template {t!r} has no '{{}}' for the class name")
  return templates

"""ImageNet-1k class names as CLIP cleaned them, their WordNet ids, and class identity of image folders.

`IMAGENET_CLASSES` (the data file `imagenet_classes.txt` beside this module) are the 1000 names of
CLIP's `notebooks/Prompt_Engineering_for_ImageNet.ipynb` (`imagenet_data.json`), in label order (index = ImageNet class id, WordNet-id sorted), the list MCM and
NegLabel prompt with. It keeps CLIP's two duplicates ('missile' at 657 and 744, 'sunglasses' at 836 and
837). `IMAGENET_TEMPLATES` (`imagenet_templates.txt`) are that notebook's 80 prompt templates.
`IMAGENET_WNIDS` (`imagenet_wnids.txt`) are the 1000 WordNet ids in the same (class index) order,
which is also their sorted order: n01440764 (tench) is 0, n01530575 (brambling) 10, n15075141 (toilet
tissue) 999.

`class_index(folders, classnames)` gives each image folder its class index and name from its name
(a wnid, or a name in a class file), never from its position among the folders: a subset of the classes
keeps the indices of the full set, and a stray folder is an error instead of a shift of every label.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from importlib import resources
from typing import Sequence


def _data_lines(name: str) -> tuple[str, ...]:
  return tuple(resources.files(__package__).joinpath(name).read_text(encoding="utf-8").splitlines())


IMAGENET_CLASSES: tuple[str, ...] = _data_lines("imagenet_classes.txt")
IMAGENET_TEMPLATES: tuple[str, ...] = _data_lines("imagenet_templates.txt")
IMAGENET_WNIDS: tuple[str, ...] = _data_lines("imagenet_wnids.txt")
WNID = re.compile(r"n\d{8}")

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


# ------------------------------------------------------------------------------------------------
# Class identity of image folders.

@dataclasses.dataclass(frozen=True)
class ClassIndex:
  """The label space (`names`, by class index) and the class index of each image folder."""
  names: tuple[str, ...]
  index: dict            # folder name -> class index
  source: str            # where the identity came from (for messages and the report)

  @property
  def subset(self) -> bool:
    return len(self.index) < len(self.names)

  def describe(self) -> str:
    n, total = len(self.index), len(self.names)
    return (f"{n} of {total} classes ({self.source})" if self.subset else f"{total} classes ({self.source})")


def _mapping_file(path: str) -> list[tuple[str, str]] | None:
  """[(folder id, name)] of a class file whose lines are '<wnid> <name>' (LOC_synset_mapping.txt style;
  an optional ':' after the wnid) or '<folder><TAB><name>', or a JSON {folder: name}; None for a plain
  file of one name per line."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if path.endswith(".json"):
    data = json.loads(text)
    return [(str(k), str(v)) for k, v in data.items()] if isinstance(data, dict) and not (
        {"classes", "imagenet_classes", "classnames"} & set(data)) else None
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if lines and all("\t" in line for line in lines):
    return [tuple(part.strip() for part in line.split("\t", 1)) for line in lines]
  if lines and all(WNID.fullmatch(line.split()[0]) for line in lines):
    return [(line.split()[0], line[len(line.split()[0]):].strip().lstrip(":").strip() or line.split()[0])
            for line in lines]
  return None


def class_names(classnames: str | Sequence[str]) -> list[str]:
  """The label space of a `classnames` spec other than 'folders': builtin names, or a class file's
  names (of '<wnid> <name>' / '<folder><TAB><name>' lines, or one name per line), by class index."""
  if isinstance(classnames, str) and os.path.isfile(classnames):
    pairs = _mapping_file(classnames)
    if pairs is not None:
      return [name for _, name in pairs]
  return load_classnames(classnames)


def class_index(folders: Sequence[str], classnames: str | Sequence[str] = "imagenet",
                root: str = "") -> ClassIndex:
  """Each folder's class index from its name.

  classnames: 'folders' (the folders are the classes: sorted names, index = position); a builtin
  ImageNet name ('imagenet'; folders are wnids, names CLIP's); a class file of '<wnid> <name>' or
  '<folder><TAB><name>' lines (index = line); or a plain names file / list (folders named like the
  classes). An unknown folder name, or more folders than classes, raises ValueError naming them.
  """
  where = f"{root}: " if root else ""
  folders = sorted(folders)
  if not folders:
    raise ValueError(f"{where}no class folders")
  if isinstance(classnames, str) and classnames == "folders":
    return ClassIndex(tuple(folders), {f: i for i, f in enumerate(folders)}, "the folder names")
  if isinstance(classnames, str) and classnames.lower() in BUILTIN:
    ids, names, source = IMAGENET_WNIDS, BUILTIN[classnames.lower()], "ImageNet-1k wnids"
    hint = ("train and val folders must be named by ImageNet-1k wnid (n01440764 = tench, ...); for other "
            "classes set data.classnames to 'folders' or to a class file of '<folder><TAB><name>' lines")
  else:
    pairs = _mapping_file(classnames) if isinstance(classnames, str) and os.path.isfile(classnames) else None
    if pairs is not None:
      ids, names = [p[0] for p in pairs], [p[1] for p in pairs]
      source = f"class file {classnames}"
    else:
      ids = names = load_classnames(classnames)
      source = f"class names {classnames if isinstance(classnames, str) else '(a list)'}"
    hint = (f"name each folder like its class in {source}, or give a class file of '<folder><TAB><name>' "
            "(or '<wnid> <name>') lines")
  position = {f: i for i, f in enumerate(ids)}
  unknown = [f for f in folders if f not in position]
  if unknown or len(folders) > len(names):
    shown = ", ".join(unknown[:10]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 10 else "")
    raise ValueError(f"{where}{len(folders)} class folders for {len(names)} classes of {source}; "
                     f"folder(s) not among them: {shown}. {hint}")
  return ClassIndex(tuple(names), {f: position[f] for f in folders}, source)

"""Stage 1, source selection: per class, the k images with the most file bytes per pixel.

score(image) = file_bytes / (width * height); keep the top `per_class` (50 in SynOOD) per class folder.

The image size is read from the header only (PIL opens lazily). Class indices follow the sorted class
folder names (as torchvision's ImageFolder, and ImageNet's wnid order). Images PIL cannot identify are
not dropped silently: each is logged and returned in `skipped`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
from typing import Iterable, NamedTuple, Sequence

from absl import logging

from synood_jax import fileio

DEFAULT_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


@dataclasses.dataclass(frozen=True)
class SourceRecord:
  class_name: str
  class_index: int
  path: str  # relative to the dataset root, '/'-separated
  bytes_per_pixel: float


class Skipped(NamedTuple):
  path: str  # relative to the dataset root
  reason: str


class Selection(NamedTuple):
  records: list[SourceRecord]  # class by class (sorted folder order), best score first within a class
  skipped: list[Skipped]  # unreadable images, by relative path


def image_size(path: str) -> tuple[int, int]:
  """(width, height) from the image header; raises OSError / ValueError if PIL cannot read it."""
  from PIL import Image
  with Image.open(path) as im:
    w, h = im.size
  if w <= 0 or h <= 0:
    raise ValueError(f"image has size {w}x{h}")
  return w, h


def bytes_per_pixel(path: str) -> float:
  w, h = image_size(path)
  return os.path.getsize(path) / (w * h)


def class_folders(root: str) -> list[str]:
  """Sorted names of the class folders under `root` (hidden folders ignored)."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{root}: not a directory")
  return sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))


def _class_files(root: str, name: str, extensions: Sequence[str]) -> list[str]:
  out = []
  base = os.path.join(root, name)
  for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for f in sorted(filenames):
      if not f.startswith(".") and f.lower().endswith(extensions):
        out.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
  return out


def _score(root: str, rel: str) -> tuple[str, float | None, str | None]:
  try:
    return rel, bytes_per_pixel(os.path.join(root, rel)), None
  except Exception as e:  # noqa: BLE001  PIL raises UnidentifiedImageError, OSError, ValueError, SyntaxError...
    return rel, None, f"{type(e).__name__}: {e}"


def select_sources(root: str, per_class: int = 50, extensions: Iterable[str] = DEFAULT_EXTENSIONS,
                   num_workers: int = 8) -> Selection:
  """Top-`per_class` images per class folder by file bytes / (width * height).

  `root/<class>/...<file>` (files in sub-folders of a class folder count for that class); extensions are
  matched case-insensitively. Ties are broken by relative path (ascending), so the result is
  deterministic. Returns `Selection(records, skipped)`.
  """
  if per_class <= 0:
    raise ValueError(f"per_class must be positive, got {per_class}")
  extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
  classes = class_folders(root)
  if not classes:
    raise ValueError(f"{root}: no class folders")
  records: list[SourceRecord] = []
  skipped: list[Skipped] = []
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
    for index, name in enumerate(classes):
      files = _class_files(root, name, extensions)
      scored = []
      for rel, score, err in pool.map(lambda r: _score(root, r), files):
        if err is None:
          scored.append((rel, score))
        else:
          logging.warning("select_sources: skipping unreadable image %s (%s)", os.path.join(root, rel), err)
          skipped.append(Skipped(rel, err))
      scored.sort(key=lambda rs: (-rs[1], rs[0]))
      if len(scored) < per_class:
        logging.warning("select_sources: class %s has %d readable images, fewer than %d", name, len(scored),
                        per_class)
      records.extend(SourceRecord(name, index, rel, score) for rel, score in scored[:per_class])
  if skipped:
    logging.warning("select_sources: %d unreadable image(s) skipped under %s", len(skipped), root)
  logging.info("select_sources: %d sources from %d classes under %s", len(records), len(classes), root)
  return Selection(records, skipped)


def write_source_list(path: str, records: Iterable[SourceRecord]) -> None:
  """JSONL, one record per line, replaced atomically (`fileio.atomic_write`)."""
  fileio.atomic_write(path, "".join(json.dumps(dataclasses.asdict(r), sort_keys=True) + "\n" for r in records))


_FIELDS = {f.name: f.type for f in dataclasses.fields(SourceRecord)}


def read_source_list(path: str) -> list[SourceRecord]:
  """Inverse of `write_source_list`; a malformed line raises ValueError naming the file and line number."""
  out = []
  with fileio.open_file(path, "r") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
        if not isinstance(obj, dict) or set(obj) != set(_FIELDS):
          raise ValueError(f"expected an object with keys {sorted(_FIELDS)}, got {line.strip()[:200]!r}")
        out.append(SourceRecord(class_name=str(obj["class_name"]), class_index=int(obj["class_index"]),
                                path=str(obj["path"]), bytes_per_pixel=float(obj["bytes_per_pixel"])))
      except (ValueError, TypeError) as e:
        raise ValueError(f"{path}:{lineno}: malformed source record ({e})") from e
  return out

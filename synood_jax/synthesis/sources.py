"""Stage 1, source selection: per class, the k images with the most file bytes per pixel.

score(image) = file_bytes / (width * height); keep the top `per_class` (50 in SynOOD) per class folder.

The image size is read from the header only (PIL opens lazily); the chosen images are then decoded in
full (a truncated JPEG has a valid header), and one that fails is replaced by the next best. Class
indices come from the caller's folder -> index map (`data.imagenet.class_index`: by wnid, never by
position) or, without one, the sorted folder order. Images that cannot be read are not dropped
silently: each is logged by path and returned in `skipped`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import tempfile
from typing import Iterable, Mapping, NamedTuple, Sequence

from absl import logging

from synood_jax.data import datasets as data
from synood_jax.progress import Progress

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
  records: list[SourceRecord]  # class by class (class index order), best score first within a class
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


def _decodes(root: str, rel: str) -> str | None:
  """None if the whole image decodes, else the error (a truncated JPEG passes the header read)."""
  from PIL import Image
  try:
    with Image.open(os.path.join(root, rel)) as im:
      im.load()
    return None
  except Exception as e:  # noqa: BLE001
    return f"{type(e).__name__}: {e}"


def _choose(pool, root: str, scored: list[tuple[str, float]], k: int, decode: bool, skipped: list):
  """The first k of `scored` (best first) that decode; the others tried are logged and skipped."""
  if not decode:
    return scored[:k]
  chosen, at = [], 0
  while len(chosen) < k and at < len(scored):
    batch = scored[at:at + k - len(chosen)]
    at += len(batch)
    for (rel, score), err in zip(batch, pool.map(lambda rs: _decodes(root, rs[0]), batch)):
      if err is None:
        chosen.append((rel, score))
      else:
        logging.warning("select_sources: skipping image that does not decode %s (%s)", os.path.join(root, rel), err)
        skipped.append(Skipped(rel, err))
  return chosen


def select_sources(root: str, per_class: int | None = 50, extensions: Iterable[str] = DEFAULT_EXTENSIONS,
                   num_workers: int = 8, class_index: Mapping[str, int] | None = None,
                   decode: bool = True) -> Selection:
  """Top-`per_class` images per class folder by file bytes / (width * height).

  `root/<class>/...<file>` (files in sub-folders of a class folder count for that class); extensions are
  matched case-insensitively. Ties are broken by relative path (ascending), so the result is
  deterministic; `per_class=None` takes every readable image. `class_index` maps folder -> class index (default: the sorted folder order; see
  `data.imagenet.class_index`). With `decode`, each chosen image is decoded in full, and one that fails
  is replaced by the next best. Returns `Selection(records, skipped)`.
  """
  if per_class is not None and per_class <= 0:
    raise ValueError(f"per_class must be positive (or None: every image), got {per_class}")
  extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
  classes = class_folders(root)
  if not classes:
    raise ValueError(data.flat_folder_message(root, "no class folders"))
  index = dict(class_index) if class_index is not None else {name: i for i, name in enumerate(classes)}
  unknown = [c for c in classes if c not in index]
  if unknown:
    raise ValueError(f"{root}: class folder(s) {unknown[:10]} have no class index")
  records: list[SourceRecord] = []
  skipped: list[Skipped] = []
  progress = Progress(total=len(classes), name="sources: scan", unit="class", every_secs=30)
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
    for name in sorted(classes, key=lambda c: (index[c], c)):
      files = _class_files(root, name, extensions)
      scored = []
      for rel, score, err in pool.map(lambda r: _score(root, r), files):
        if err is None:
          scored.append((rel, score))
        else:
          logging.warning("select_sources: skipping unreadable image %s (%s)", os.path.join(root, rel), err)
          skipped.append(Skipped(rel, err))
      scored.sort(key=lambda rs: (-rs[1], rs[0]))
      chosen = _choose(pool, root, scored, per_class or len(scored), decode, skipped)
      if per_class and len(chosen) < per_class:
        logging.warning("select_sources: class %s has %d readable images, fewer than %d", name, len(chosen),
                        per_class)
      records.extend(SourceRecord(name, index[name], rel, score) for rel, score in chosen)
      progress.update(extra=f"{len(records)} sources")
  if skipped:
    logging.warning("select_sources: %d unreadable image(s) skipped under %s", len(skipped), root)
  logging.info("select_sources: %d sources from %d classes under %s", len(records), len(classes), root)
  return Selection(records, skipped)


def write_source_list(path: str, records: Iterable[SourceRecord]) -> None:
  """JSONL, one record per line; written to a temporary file in the same folder, then os.replace'd."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      for r in records:
        f.write(json.dumps(dataclasses.asdict(r), sort_keys=True) + "\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


_FIELDS = {f.name: f.type for f in dataclasses.fields(SourceRecord)}


def read_source_list(path: str) -> list[SourceRecord]:
  """Inverse of `write_source_list`; a malformed line raises ValueError naming the file and line number."""
  out = []
  with open(path) as f:
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

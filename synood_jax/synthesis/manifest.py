"""The synthesis output folder: images, `manifest.jsonl` (one record per finished image, in source order)
and the per-process manifests a run appends to, merged on resume.

Resumable: an image is written atomically before its manifest line, a rerun skips sources with both, and
the finished manifest is rewritten in source order, so a run killed at any moment and rerun equals an
uninterrupted one; the resume state is the union of every manifest, whatever process count wrote them.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from PIL import Image

from synood_jax import fileio
from synood_jax.jsonl import read_jsonl

# Output files: extension and PIL save arguments. The official script saves `{name}_ood.JPEG` with PIL's
# default JPEG settings (quality 75, 4:2:0 chroma subsampling).
IMAGE_FORMATS = {"jpeg": ".JPEG", "png": ".png"}


def manifest_path(out_dir: str) -> str:
  """The merged manifest of an output folder (the pipeline's `Workdir.synthesis_manifest`)."""
  return os.path.join(out_dir, "manifest.jsonl")


def output_relpath(record, image_format: str) -> str:
  """`<class>/<stem>_ood.<ext>` for a `sources.SourceRecord`."""
  stem = os.path.splitext(os.path.basename(record.path))[0]
  return os.path.join(record.class_name, f"{stem}_ood{IMAGE_FORMATS[image_format]}")


def read_records(path: str) -> dict[str, dict]:
  """Manifest records by source path; a torn last line (killed mid-write) is dropped, any other bad
  line raises (the next stage would otherwise train on fewer images without a word)."""
  return {rec["source"]: rec for rec in read_jsonl(path, required=("source", "output"))}


def process_manifest(out_dir: str, process: int) -> str:
  """The manifest a process appends to while it runs; on one process it is manifest.jsonl itself."""
  return os.path.join(out_dir, f"manifest.{process}.jsonl")


def _process_manifests(out_dir: str) -> list[str]:
  """Every per-process manifest in out_dir: also those of an earlier run with another process count."""
  names = fileio.path(out_dir).glob("manifest.*.jsonl") if fileio.exists(out_dir) else []
  return sorted(os.path.join(out_dir, p.name) for p in names)


def consolidate(out_dir: str, order: Sequence[str], check_outputs: bool = False) -> dict[str, dict]:
  """Process 0 only, while no process synthesizes: the union of manifest.jsonl and every
  manifest.<i>.jsonl (records whose PNG exists, with `check_outputs`) is written to manifest.jsonl in
  source order, then the per-process manifests and the temporary files killed writers left are removed.

  Whatever killed which process of whichever process count, the union holds each finished image once,
  so a rerun with any number of processes only synthesizes what is missing.
  """
  path = manifest_path(out_dir)
  parts = _process_manifests(out_dir)
  records = read_records(path)
  for part in parts:
    records.update(read_records(part))
  if check_outputs:
    records = {s: r for s, r in records.items() if fileio.exists(os.path.join(out_dir, r["output"]))}
  fileio.atomic_write(path, "".join(json.dumps(records[s], sort_keys=True) + "\n" for s in order if s in records))
  for part in parts:
    fileio.path(part).unlink()
  fileio.remove_temp_files(out_dir)
  return records


def write_image(pixels: np.ndarray, path: str, image_format: str, jpeg_quality: int) -> None:
  """A synthetic image, atomically, by the process that made it (PIL JPEG at `jpeg_quality`, or PNG)."""
  options = {"format": "JPEG", "quality": int(jpeg_quality)} if image_format == "jpeg" else {"format": "PNG"}
  fileio.atomic_write(path, lambda f: Image.fromarray(pixels).save(f, **options), per_process=True)

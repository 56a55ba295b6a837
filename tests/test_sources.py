"""Stage 1 source selection against a numpy computation of bytes / (width * height)."""
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from synood_jax.synthesis import sources


def _jpeg(path, w, h, quality, seed):
  rng = np.random.default_rng(seed)
  # smooth + noise so that quality changes the file size a lot
  yy, xx = np.mgrid[0:h, 0:w]
  base = (np.sin(xx / 7.0)[..., None] * 60 + np.cos(yy / 5.0)[..., None] * 60 + 128)
  img = np.clip(base + rng.normal(0, 30, size=(h, w, 3)), 0, 255).astype(np.uint8)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(img).save(path, format="JPEG", quality=quality)


@pytest.fixture
def dataset(tmp_path):
  root = tmp_path / "train"
  rng = np.random.default_rng(0)
  specs = {"n02": 7, "n01": 5, "n03": 2}  # class folder -> number of images (n03 has fewer than k)
  seed = 0
  for cls, n in specs.items():
    for i in range(n):
      w, h = int(rng.integers(24, 80)), int(rng.integers(24, 80))
      _jpeg(str(root / cls / f"{cls}_{i}.JPEG"), w, h, quality=int(rng.integers(10, 95)), seed=seed)
      seed += 1
  # an exact tie: the same bytes under a name that sorts first
  shutil.copy(root / "n01" / "n01_3.JPEG", root / "n01" / "n01_0a.JPEG")
  # unreadable images, a non-image file, a hidden file, and a nested file with a lowercase extension
  (root / "n02" / "broken.JPEG").write_bytes(b"not a jpeg at all")
  (root / "n03" / "empty.jpeg").write_bytes(b"")
  (root / "n02" / "notes.txt").write_text("ignore me")
  (root / "n02" / ".hidden.JPEG").write_bytes(b"junk")
  _jpeg(str(root / "n03" / "sub" / "n03_nested.jpg"), 40, 30, quality=50, seed=99)
  (root / "empty_class").mkdir()
  return root


def _expected(root, k):
  out = []
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  for idx, cls in enumerate(classes):
    rows = []
    for dirpath, _, files in os.walk(os.path.join(root, cls)):
      for f in files:
        full = os.path.join(dirpath, f)
        rel = os.path.relpath(full, root)
        if f.startswith(".") or not f.lower().endswith((".jpeg", ".jpg")):
          continue
        try:
          w, h = np.asarray(Image.open(full).convert("RGB")).shape[1::-1]  # full decode, not the header
        except Exception:  # noqa: BLE001
          continue
        rows.append((rel, os.path.getsize(full) / float(w * h)))
    names = np.array([r[0] for r in rows], dtype=object)
    scores = np.array([r[1] for r in rows], dtype=np.float64)
    order = np.lexsort((names.astype(str), -scores)) if rows else []
    out += [(cls, idx, names[i], scores[i]) for i in order[:k]]
  return out


@pytest.mark.parametrize("k", [1, 3, 50])
def test_select_matches_numpy(dataset, k):
  sel = sources.select_sources(str(dataset), per_class=k, num_workers=2)
  got = [(r.class_name, r.class_index, r.path, r.bytes_per_pixel) for r in sel.records]
  exp = _expected(str(dataset), k)
  assert [g[:3] for g in got] == [e[:3] for e in exp]
  np.testing.assert_allclose([g[3] for g in got], [e[3] for e in exp], rtol=1e-12)
  assert sorted(s.path for s in sel.skipped) == ["n02/broken.JPEG", "n03/empty.jpeg"]
  assert all(s.reason for s in sel.skipped)
  # class indices follow the sorted folder names, including the empty class
  assert {r.class_name: r.class_index for r in sel.records} == {"n01": 1, "n02": 2, "n03": 3}


def test_ties_broken_by_name(dataset):
  sel = sources.select_sources(str(dataset), per_class=50)
  n01 = [r.path for r in sel.records if r.class_name == "n01"]
  i, j = n01.index("n01/n01_0a.JPEG"), n01.index("n01/n01_3.JPEG")
  assert j == i + 1
  assert sel.records[i].bytes_per_pixel == sel.records[j].bytes_per_pixel


def test_quality_orders_scores(tmp_path):
  root = tmp_path / "r"
  for q in (10, 50, 95):
    _jpeg(str(root / "c" / f"q{q:02d}.JPEG"), 64, 48, quality=q, seed=1)
  sel = sources.select_sources(str(root), per_class=2)
  assert [r.path for r in sel.records] == ["c/q95.JPEG", "c/q50.JPEG"]
  assert sel.records[0].bytes_per_pixel == pytest.approx(os.path.getsize(root / "c" / "q95.JPEG") / (64 * 48))


def test_skipped_are_logged(dataset):
  from absl import logging as absl_logging
  seen = []
  orig = absl_logging.warning
  absl_logging.warning = lambda msg, *a: seen.append(msg % a)
  try:
    sources.select_sources(str(dataset), per_class=2)
  finally:
    absl_logging.warning = orig
  assert any("broken.JPEG" in m for m in seen) and any("empty.jpeg" in m for m in seen)
  assert any("2 unreadable" in m for m in seen)


def test_write_read_roundtrip(dataset, tmp_path):
  sel = sources.select_sources(str(dataset), per_class=3)
  out = tmp_path / "lists" / "sources.jsonl"
  sources.write_source_list(str(out), sel.records)
  assert sources.read_source_list(str(out)) == sel.records
  assert os.listdir(out.parent) == ["sources.jsonl"]  # no temporary file left behind
  # overwriting replaces the file as a whole
  sources.write_source_list(str(out), sel.records[:2])
  assert sources.read_source_list(str(out)) == sel.records[:2]


def test_read_malformed_line_names_file_and_line(tmp_path):
  p = tmp_path / "s.jsonl"
  good = '{"bytes_per_pixel": 1.5, "class_index": 0, "class_name": "a", "path": "a/x.JPEG"}\n'
  p.write_text(good + "\n" + '{"class_name": "a", "path": "a/y.JPEG"}\n')
  with pytest.raises(ValueError, match=r"s\.jsonl:3"):
    sources.read_source_list(str(p))
  p.write_text(good + "{not json\n")
  with pytest.raises(ValueError, match=r"s\.jsonl:2"):
    sources.read_source_list(str(p))


def test_bad_root_and_k(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    sources.select_sources(str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="per_class"):
    sources.select_sources(str(tmp_path), per_class=0)

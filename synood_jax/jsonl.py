"""JSON-lines files that a killed job may have cut: only a torn LAST line is forgiven.

A line is torn when it lacks its newline or does not parse and nothing follows it; any other bad line
means the file was damaged or edited, and reading it silently would drop data, so it raises.
"""
from __future__ import annotations

import json
import os


class JsonlError(ValueError):
  pass


def read_jsonl(path: str, required: tuple[str, ...] = ()) -> list[dict]:
  """Rows of `path` ([] if it does not exist), dropping a torn last line; other bad lines raise."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.readlines()
  rows = []
  for i, line in enumerate(lines):
    last = i == len(lines) - 1
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      if last:
        break  # cut by a kill mid-write
      raise JsonlError(f"{path}: line {i + 1} is not JSON ({e.msg}); only a torn last line is expected "
                       "after a kill, so this file was damaged or edited") from None
    if last and not line.endswith("\n"):
      break  # parsed, but its write may not have completed
    missing = [k for k in required if k not in row]
    if missing:
      raise JsonlError(f"{path}: line {i + 1} lacks the key(s) {missing}")
    rows.append(row)
  return rows

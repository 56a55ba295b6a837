"""Stage 1, context prompts: the in-painting prompt of each source from an MLLM's answer about it.

prompt = "A photo only remain " + answer[:73] + "."   (official `generate_near_ood_sample.py`)

Answers files (read by `read_contexts`):
- LLaVA-style answers JSONL: one object per line with the answer under `text` and the image under the
  first present of `PATH_KEYS` = image, image_path, image_file, file, path, question_id (LLaVA's
  `model_vqa` writes `question_id`, `prompt`, `text`, `answer_id`, `model_id`, `metadata`; other keys are
  ignored). A JSON list of such objects is read too.
- `{path: text}`: one or more objects per line (JSONL), or a single JSON object over the whole file.
  A line object that has a `text` key is read as a LLaVA record, otherwise as a `{path: text}` mapping.

Paths are normalized (`\\` -> `/`, `./` and `..` resolved) and matched to a source's path relative to the
dataset root: exactly, then as a path suffix (an absolute path ending in `/<class>/<file>`), then by
basename, then by basename without extension (a bare `question_id`). A match that is ambiguous at the
first tier that finds anything raises an error; the first answer of a duplicated path wins (logged).
"""
from __future__ import annotations

import json
import posixpath
from typing import Any, Iterable, Mapping, NamedTuple

from absl import logging

PATH_KEYS = ("image", "image_path", "image_file", "file", "path", "question_id")
TEXT_KEY = "text"
OFFICIAL_TEMPLATE = "A photo only remain {context}."
OFFICIAL_MAX_CHARS = 73
# Ours, not the official code's (it has no fallback: every source has an answer there).
DEFAULT_FALLBACK_PROMPT = "A photo only remain the background."


class ContextFileError(ValueError):
  """An answers file that cannot be read; the message names the file and the line (or item)."""


def normalize_path(path: Any) -> str:
  p = str(path).strip().replace("\\", "/")
  if not p:
    return p
  p = posixpath.normpath(p)
  return p[2:] if p.startswith("./") else p


def _stem(path: str) -> str:
  base = posixpath.basename(path)
  stem, _ = posixpath.splitext(base)
  return stem or base


def build_prompt(context: str, template: str = OFFICIAL_TEMPLATE, max_chars: int | None = OFFICIAL_MAX_CHARS) -> str:
  """template.format(context=context[:max_chars]); the defaults give the official prompt exactly."""
  return template.format(context=context[:max_chars])


def _record_items(obj: Any, where: str) -> list[tuple[str, str]]:
  """(path, text) pairs of one JSON value of an answers file; `where` is 'file:line N' for errors."""
  if not isinstance(obj, dict):
    raise ContextFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  if TEXT_KEY in obj:  # a LLaVA-style record
    key = next((k for k in PATH_KEYS if obj.get(k) not in (None, "")), None)
    if key is None:
      raise ContextFileError(f"{where}: record has '{TEXT_KEY}' but no image path under any of {list(PATH_KEYS)}")
    text = obj[TEXT_KEY]
    if not isinstance(text, str):
      raise ContextFileError(f"{where}: '{TEXT_KEY}' is {type(text).__name__}, expected a string")
    return [(normalize_path(obj[key]), text)]
  out = []
  for path, text in obj.items():  # {path: text}
    if not isinstance(text, str):
      raise ContextFileError(f"{where}: value of {path!r} is {type(text).__name__}, expected a string "
                             f"(or a record with '{TEXT_KEY}' and one of {list(PATH_KEYS)})")
    if not normalize_path(path):
      raise ContextFileError(f"{where}: empty path key")
    out.append((normalize_path(path), text))
  return out


def read_contexts(path: str) -> dict[str, str]:
  """{normalized image path: answer text} from a LLaVA answers JSONL or a {path: text} JSON(L) file."""
  with open(path, encoding="utf-8") as f:
    content = f.read()
  items: list[tuple[str, str]] = []
  try:
    whole = json.loads(content)
  except json.JSONDecodeError:
    whole = None
    for lineno, line in enumerate(content.splitlines(), 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ContextFileError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
      items += _record_items(obj, where)
  else:
    if isinstance(whole, list):
      for i, obj in enumerate(whole):
        items += _record_items(obj, f"{path}: item {i}")
    else:
      items += _record_items(whole, f"{path}:1")
  out: dict[str, str] = {}
  dup = 0
  for p, text in items:
    if p in out:
      dup += 1
      continue
    out[p] = text
  if dup:
    logging.warning("read_contexts: %s has %d duplicated image path(s); the first answer of each is kept", path, dup)
  logging.info("read_contexts: %d contexts from %s", len(out), path)
  return out


class ContextIndex:
  """Looks up a source's context by relative path, path suffix, basename, then basename stem."""

  def __init__(self, contexts: Mapping[str, str]):
    self._exact: dict[str, str] = {}
    self._by_base: dict[str, list[str]] = {}
    self._by_stem: dict[str, list[str]] = {}
    for k, text in contexts.items():
      k = normalize_path(k)
      if k in self._exact:
        continue
      self._exact[k] = text
      self._by_base.setdefault(posixpath.basename(k), []).append(k)
      self._by_stem.setdefault(_stem(k), []).append(k)

  def __len__(self):
    return len(self._exact)

  def _pick(self, rel: str, keys: list[str], tier: str) -> str | None:
    if not keys:
      return None
    texts = {self._exact[k] for k in keys}
    if len(texts) > 1:
      raise ValueError(f"context for source {rel!r} is ambiguous by {tier}: {sorted(keys)[:5]}")
    return self._exact[keys[0]]

  def lookup(self, source_path: str) -> str | None:
    rel = normalize_path(source_path)
    if rel in self._exact:
      return self._exact[rel]
    base = posixpath.basename(rel)
    same_base = self._by_base.get(base, [])
    found = self._pick(rel, [k for k in same_base if k.endswith("/" + rel)], "path suffix")
    if found is None:
      found = self._pick(rel, same_base, "basename")
    if found is None:
      found = self._pick(rel, self._by_stem.get(_stem(rel), []), "basename without extension")
    return found


class Prompts(NamedTuple):
  prompts: dict[str, str]  # source relative path -> prompt, in the order of the records
  missing: int  # sources without a context (skipped, or given the fallback prompt)


def _source_path(record: Any) -> str:
  if isinstance(record, str):
    return record
  if isinstance(record, Mapping):
    return record["path"]
  return record.path


def prompts_for_sources(records: Iterable[Any], contexts: Mapping[str, str] | ContextIndex | str,
                        policy: str = "skip", fallback_prompt: str = DEFAULT_FALLBACK_PROMPT,
                        template: str = OFFICIAL_TEMPLATE, max_chars: int | None = OFFICIAL_MAX_CHARS) -> Prompts:
  """Prompts for sources (`sources.SourceRecord`, dicts with 'path', or relative paths).

  `contexts`: an answers file path, a {path: text} mapping, or a `ContextIndex`. A source without
  context is left out (`policy='skip'`) or given `fallback_prompt` as it is (`policy='fallback'`); either
  way it is counted in `missing` and logged.
  """
  if policy not in ("skip", "fallback"):
    raise ValueError(f"policy must be 'skip' or 'fallback', got {policy!r}")
  if isinstance(contexts, str):
    contexts = read_contexts(contexts)
  index = contexts if isinstance(contexts, ContextIndex) else ContextIndex(contexts)
  prompts: dict[str, str] = {}
  missing: list[str] = []
  total = 0
  for record in records:
    total += 1
    rel = _source_path(record)
    context = index.lookup(rel)
    if context is None:
      missing.append(rel)
      if policy == "fallback":
        prompts[rel] = fallback_prompt
      continue
    prompts[rel] = build_prompt(context, template, max_chars)
  if missing:
    logging.warning("prompts_for_sources: %d of %d source(s) have no context (%s): %s%s", len(missing), total,
                    "skipped" if policy == "skip" else "fallback prompt", missing[:5],
                    " ..." if len(missing) > 5 else "")
  else:
    logging.info("prompts_for_sources: all %d sources have a context", len(prompts))
  return Prompts(prompts, len(missing))


__all__ = ["PATH_KEYS", "TEXT_KEY", "OFFICIAL_TEMPLATE", "OFFICIAL_MAX_CHARS", "DEFAULT_FALLBACK_PROMPT",
           "ContextFileError", "ContextIndex", "Prompts", "build_prompt", "normalize_path", "prompts_for_sources",
           "read_contexts"]

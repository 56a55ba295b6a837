"""Which config produced each stage's outputs, and which stages a changed config makes stale.

  fingerprint(stage) = sha256(json{version, the config fields the stage reads, fingerprint(consumed)
                                   for every stage it consumes, the code's sha256 (code_version.py)})

A stage reads config groups or single fields (dotted paths, e.g. "synthesis" or "models.dtype"); a group
stands for all its leaves. Fields that change only speed or logging (batch sizes of frozen encoders,
log intervals) are left out, so changing them keeps the results. Because a fingerprint includes those
of the stages it consumes, a change re-runs its stage and everything downstream, and nothing else.

A changed code version reruns every stage (and restarts a killed one rather than resume it with other
code); `changes` names the files that differ. Each done marker stores {fingerprint, fields, upstream, code}; `started/<stage>.json` stores the same when a
stage starts, so a killed stage resumes only if nothing it depends on changed since.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping, Sequence

from synood_jax.pipeline import code_version

ON_CHANGE = ("rerun", "error")


@dataclasses.dataclass(frozen=True)
class Fingerprint:
  value: str
  fields: dict            # dotted field -> value (JSON-normalised)
  upstream: dict          # consumed stage -> its fingerprint
  version: int = 1
  code: dict | None = None  # code_version.current(): {version, sha256, files}

  def as_dict(self) -> dict:
    out = {"fingerprint": self.value, "fields": self.fields, "upstream": self.upstream, "version": self.version}
    if self.code is not None:
      out["code"] = self.code
    return out


def _plain(value: Any) -> Any:
  """A JSON-normalised copy (ConfigDicts -> dicts, tuples -> lists), so stored and current values compare."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  return json.loads(json.dumps(value, sort_keys=True, default=str))


def _flatten(prefix: str, value: Any, out: dict) -> None:
  if isinstance(value, dict) and value:
    for k, v in value.items():
      _flatten(f"{prefix}.{k}", v, out)
  else:
    out[prefix] = value


def read_fields(config, paths: Sequence[str], ignore: Sequence[str] = ()) -> dict:
  """{dotted leaf: value} of the config groups / fields in `paths`, without those in `ignore`."""
  out: dict = {}
  for path in paths:
    node = config
    for part in path.split("."):
      if part not in node:
        raise KeyError(f"stage field {path!r}: the config has no {part!r}")
      node = node[part]
    _flatten(path, _plain(node), out)
  skip = set(ignore)
  return {k: v for k, v in sorted(out.items()) if k not in skip}


def fingerprints(config, reads: Mapping[str, Sequence[str]], consumes: Mapping[str, Sequence[str]],
                 versions: Mapping[str, int], ignore: Sequence[str] = (),
                 code: Mapping | None = None) -> dict[str, Fingerprint]:
  """Every stage's fingerprint, in the order of `reads` (consumed stages must come earlier); with `code`
  ({version, sha256, files}), the code version is part of each."""
  out: dict[str, Fingerprint] = {}
  for stage, paths in reads.items():
    missing = [u for u in consumes.get(stage, ()) if u not in out]
    if missing:
      raise ValueError(f"stage {stage} consumes {missing}, which are not declared before it")
    fields = read_fields(config, paths, ignore)
    upstream = {u: out[u].value for u in consumes.get(stage, ())}
    version = int(versions.get(stage, 1))
    key = {"version": version, "fields": fields, "upstream": upstream}
    if code is not None:
      key["code"] = [code["version"], code["sha256"]]
    blob = json.dumps(key, sort_keys=True)
    out[stage] = Fingerprint(hashlib.sha256(blob.encode()).hexdigest(), fields, upstream, version,
                             dict(code) if code is not None else None)
  return out


def changes(stored: Mapping | None, current: Fingerprint) -> list[str]:
  """What differs between a stored {fingerprint, fields, upstream} and the current fingerprint,
  as lines such as 'synthesis.step_size: 10.0 -> inf' or 'input stage sources changed'."""
  if not stored or "fingerprint" not in stored:
    return ["no fingerprint recorded (made by an older version)"]
  if stored["fingerprint"] == current.value:
    return []
  out = []
  if stored.get("version") != current.version:
    out.append(f"code version {stored.get('version')} -> {current.version}")
  out += _code_changes(stored.get("code"), current.code)
  old = stored.get("fields", {})
  for k in sorted(set(old) | set(current.fields)):
    a, b = old.get(k, "<absent>"), current.fields.get(k, "<absent>")
    if a != b:
      out.append(f"{k}: {json.dumps(a)} -> {json.dumps(b)}")
  for u in sorted(set(stored.get("upstream", {})) | set(current.upstream)):
    if stored.get("upstream", {}).get(u) != current.upstream.get(u):
      out.append(f"input stage {u} changed")
  return out or ["fingerprint differs"]


def _code_changes(old: Mapping | None, new: Mapping | None) -> list[str]:
  if new is None:
    return []
  if not old:
    return ["no code version recorded (made by an older version)"]
  if (old.get("version"), old.get("sha256")) == (new["version"], new["sha256"]):
    return []
  out = [f"package version {old.get('version')} -> {new['version']}"] if old.get("version") != new["version"] else []
  files = code_version.changed_files(old.get("files", {}), new["files"])
  if files:
    shown = ", ".join(files[:10]) + (f" and {len(files) - 10} more" if len(files) > 10 else "")
    out.append(f"code changed: {shown}")
  return out or ["code changed"]

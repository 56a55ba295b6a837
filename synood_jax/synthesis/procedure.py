"""The procedure an output folder was written with (`procedure.json`): a folder written by another
procedure (another `PROCEDURE_VERSION` or other output-determining fields) is refused, never resumed."""
from __future__ import annotations

import json
import os

import jax.numpy as jnp

from synood_jax import fileio
from synood_jax.synthesis import manifest

# Bump when the same config gives other images (the pipeline's stage fingerprint uses it too).
# 2: per-image health status. 3: the update is dL/du at the decoder's input (issue 15); before, dL/dz0,
# a 1/scaling_factor = 5.49x larger step.
PROCEDURE_VERSION = 3
# config.synthesis fields that change an image (batch size, decode chunk and logging do not).
OUTPUT_FIELDS = ("seed", "image_size", "steps", "strength", "guidance_scale", "scheduler", "iterations",
                 "step_size", "target", "loss", "grad_mode", "reference_batch", "classifier",
                 "clip_logit_scale", "resnet_path", "image_format", "jpeg_quality")


class StaleSynthesisError(ValueError):
  """An output folder holds images of another synthesis procedure; the message names what differs."""


def procedure(settings, pipe) -> dict:
  """What determines this run's images: the procedure version, the output fields of the settings
  (`synthesize.Settings`; the guidance and scheduler choices as far as the config stated them), the
  scheduler actually used and the networks' dtype."""
  fields = {k: getattr(settings, k) for k in OUTPUT_FIELDS if getattr(settings, k) is not None}
  out = {"version": PROCEDURE_VERSION, "scheduler_kind": pipe.scheduler.kind,
         "dtype": jnp.dtype(pipe.unet.dtype).name, "config": fields}
  return json.loads(json.dumps(out, sort_keys=True))


def check_procedure(out_dir: str, expected: dict, manifest_path: str) -> None:
  """Record `expected` in out_dir/procedure.json, or refuse a folder written by another procedure."""
  path = os.path.join(out_dir, "procedure.json")
  if fileio.exists(path):
    found = json.loads(fileio.path(path).read_text())
    if found != expected:
      diff = [f"{k}: {found.get(k)!r} -> {expected.get(k)!r}" for k in sorted(set(found) | set(expected))
              if k != "config" and found.get(k) != expected.get(k)]
      fc, ec = found.get("config", {}), expected["config"]
      diff += [f"config.synthesis.{k}: {fc.get(k)!r} -> {ec.get(k)!r}" for k in sorted(set(fc) | set(ec))
               if fc.get(k) != ec.get(k)]
      raise StaleSynthesisError(
          f"{out_dir}: its images were synthesized by another procedure ({'; '.join(diff)}). "
          "Delete the folder (or use another workdir) to synthesize them again.")
    return
  if manifest.read_records(manifest_path):
    raise StaleSynthesisError(
        f"{out_dir}: {os.path.basename(manifest_path)} lists images but there is no procedure.json: they "
        "were written before procedure versions were recorded (refinement step 5.49x the official one). "
        "Delete the folder (or use another workdir) to synthesize them again.")
  fileio.atomic_write(path, json.dumps(expected, indent=1, sort_keys=True))

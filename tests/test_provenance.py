"""Provenance and early checks (issue 11, items 2 and 8), without models: the stage functions are
replaced by recorders, so what is tested is `stages.run`'s decisions.

Before: rerunning a workdir with another step_size, target and stage2.epochs printed 11 "already done"
lines and exited 0; a typo in sd_path surfaced only after the sources stage had scanned every header."""
import json
import os
import sys

import pytest

from synood_jax.pipeline import inputs, provenance, stages
from synood_jax.pipeline.workdir import Workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_config():
  sys.path.insert(0, ROOT)
  from configs import demo
  return demo.get_config()


@pytest.fixture
def recorder(monkeypatch):
  """Every stage function replaced by one that records its call (synthesis also leaves an image)."""
  calls = []

  def fake(name):
    def fn(ctx):
      calls.append(name)
      if name == "synthesis":
        os.makedirs(ctx.wd.synthesis, exist_ok=True)
        open(os.path.join(ctx.wd.synthesis, "made_by_run_%d.png" % len(calls)), "w").close()
      return {"ran": name}
    return fn
  for name in stages.STAGES:
    monkeypatch.setitem(stages.STAGE_FNS, name, fake(name))
  return calls


def test_fingerprints_change_exactly_downstream():
  base = provenance.fingerprints(demo_config(), stages.READS, stages.CONSUMES, stages.VERSIONS, stages.NOT_RESULTS)

  def changed(**edits):
    c = demo_config()
    for path, value in edits.items():
      group, field = path.split("__")
      c[group][field] = value
    fps = provenance.fingerprints(c, stages.READS, stages.CONSUMES, stages.VERSIONS, stages.NOT_RESULTS)
    return [s for s in stages.STAGES if fps[s].value != base[s].value]

  after_synthesis = ["synthesis", "features", "stage2", "stage3", "export", "evaluate", "report"]
  assert changed(synthesis__step_size=20.0) == after_synthesis
  assert changed(synthesis__target=-2.5) == after_synthesis
  assert changed(stage2__epochs=3) == ["stage2", "export", "evaluate", "report"]
  assert changed(negatives__keep_fraction=0.3) == ["negatives", "features", "stage2", "stage3", "export",
                                                   "evaluate", "report"]
  # speed and logging only: nothing re-runs
  assert changed(synthesis__batch_size=16, stage2__progress_every_secs=1.0, eval__batch_size=8) == []


def test_rerun_with_a_changed_field(tmp_path, recorder, caplog):
  wd = Workdir(str(tmp_path))
  stages.run(demo_config(), wd.root)
  assert recorder == list(stages.STAGES)
  assert json.load(open(wd.config))["synthesis"]["step_size"] == 55.0     # the full resolved config
  done = json.load(open(wd.done("synthesis")))["provenance"]
  assert done["fields"]["synthesis.step_size"] == 55.0 and set(done["upstream"]) == {"models", "data", "sources"}
  recorder.clear()
  stages.run(demo_config(), wd.root)
  assert recorder == []                                                  # same config: all skipped

  c = demo_config()
  c.synthesis.step_size = 20.0
  c.stage2.epochs = 3
  c.on_change = "error"                                                  # refuses, runs nothing
  with pytest.raises(ValueError) as e:
    stages.run(c, wd.root)
  print(e.value)
  assert "synthesis: synthesis.step_size: 55.0 -> 20.0" in str(e.value)
  assert "stage2: stage2.epochs: 10 -> 3; input stage features changed" in str(e.value)
  assert recorder == [] and os.path.exists(os.path.join(wd.synthesis, "made_by_run_4.png"))

  c.on_change = "rerun"
  with caplog.at_level("WARNING"):
    stages.run(c, wd.root)
  assert recorder == ["synthesis", "features", "stage2", "stage3", "export", "evaluate", "report"]
  assert any("stage synthesis: inputs changed since it ran, re-running it (synthesis.step_size: 55.0 -> 20.0)"
             in r.getMessage() for r in caplog.records)
  # the old synthesis output was not reused: the folder holds only what the rerun made
  assert os.listdir(wd.synthesis) == ["made_by_run_1.png"]
  assert json.load(open(wd.config))["synthesis"]["step_size"] == 20.0


def test_killed_stage_resumes_only_with_the_same_inputs(tmp_path, recorder):
  wd = Workdir(str(tmp_path))
  stages.run(demo_config(), wd.root, ["models", "data", "sources", "synthesis"])
  # as if synthesis had been killed: started marker and partial outputs, no done marker
  os.remove(wd.done("synthesis"))
  fps, steps = stages.plan(demo_config(), wd, ["synthesis"])
  assert [(s.stage, s.action) for s in steps] == [("synthesis", "resume")]
  c = demo_config()
  c.synthesis.target = -2.5
  _, steps = stages.plan(c, wd, ["synthesis"])
  assert steps[0].action == "rerun" and steps[0].changes == ["synthesis.target: -1.8 -> -2.5"]
  # a stage whose inputs are stale and not part of this run is refused
  with pytest.raises(ValueError, match=r"stage features needs stage\(s\) \['synthesis', 'negatives'\]"):
    stages.plan(c, wd, ["features"])


def test_paths_checked_before_any_stage(tmp_path, recorder):
  """A typo in sd_path (with a missing train folder, label list and evaluation sets) is one error before
  `sources`."""
  clip_dir = tmp_path / "clip"
  clip_dir.mkdir()
  for f in ("config.json", "model.safetensors", "vocab.json"):
    (clip_dir / f).write_text("{}")
  c = demo_config()
  c.data.generate = {}
  c.models.clip_path = str(clip_dir)
  c.models.sd_path = str(tmp_path / "stable-diffusion-2-inpaintng")
  c.data.train_root = str(tmp_path / "imagenet" / "train")
  c.negatives.label_list = str(tmp_path / "neglabel.txt")
  with pytest.raises(inputs.InputError) as e:
    stages.run(c, str(tmp_path / "run"))
  msg = str(e.value)
  print(msg)
  assert msg.startswith("5 path(s) named by the config are missing or incomplete (checked before any stage runs)")
  assert f"models.sd_path='{tmp_path}/stable-diffusion-2-inpaintng': no such folder" in msg
  assert "data.train_root=" in msg and "negatives.label_list=" in msg and "models.clip_path" not in msg
  assert "eval.id_set='imagenet_val': set 'imagenet_val': no spec given and config.data_dir is empty" in msg
  assert recorder == [] and not os.path.exists(Workdir(str(tmp_path / "run")).done("models"))
  # an SD folder with its parts but no UNet weights: named precisely
  sd = tmp_path / "sd"
  for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
    (sd / sub).mkdir(parents=True)
  (sd / "model_index.json").write_text("{}")
  for sub in ("vae", "text_encoder"):
    (sd / sub / "config.json").write_text("{}")
    (sd / sub / "diffusion_pytorch_model.safetensors").write_text("")
  (sd / "unet" / "config.json").write_text("{}")
  (sd / "tokenizer" / "vocab.json").write_text("{}")
  (sd / "scheduler" / "scheduler_config.json").write_text("{}")
  assert inputs.sd_folder(str(sd)) == [
      "unet/: no weight file (model.safetensors, diffusion_pytorch_model.safetensors, pytorch_model.bin, "
      "diffusion_pytorch_model.bin)"]
  assert inputs.clip_folder(str(clip_dir)) == []
  # only the stages that run are checked: the report alone needs no model folder
  assert [f for f, _, p in inputs.checks(c, ["report"]) if p] == []

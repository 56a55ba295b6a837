"""Provenance and early checks (issue 11, items 2 and 8), without models: the stage functions are
replaced by recorders, so what is tested is `runner.run`'s decisions.

Before: rerunning a workdir with another step_size, target and stage2.epochs printed 11 "already done"
lines and exited 0; a typo in sd_path surfaced only after the sources stage had scanned every header."""
import dataclasses
import json
import os
import sys

import pytest

from synood_jax.pipeline import run_context, inputs, runner, stages, values
from synood_jax.pipeline.workdir import Workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _replace_run(monkeypatch, name, run):
  """The stage `name` with another function (for this test only)."""
  monkeypatch.setitem(stages.BY_NAME, name, dataclasses.replace(stages.BY_NAME[name], run=run))


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
    _replace_run(monkeypatch, name, fake(name))
  return calls


def test_fingerprints_change_exactly_downstream():
  base = runner.fingerprints(demo_config())

  def changed(**edits):
    c = demo_config()
    for path, value in edits.items():
      group, field = path.split("__")
      c[group][field] = value
    fps = runner.fingerprints(c)
    return [s for s in stages.STAGES if fps[s].value != base[s].value]

  after_synthesis = ["synthesis", "features", "stage2", "stage3", "export", "evaluate", "report"]
  assert changed(synthesis__step_size=20.0) == after_synthesis
  assert changed(synthesis__target=-2.5) == after_synthesis
  assert changed(stage2__epochs=3) == ["stage2", "export", "evaluate", "report"]
  assert changed(negatives__keep_fraction=0.3) == ["negatives", "features", "stage2", "stage3", "export",
                                                   "evaluate", "report"]
  # every output's owner covers what it depends on (issue 19, case 4): the export holds NegLabel's seed,
  # the evaluation owns its plots
  assert changed(eval__seed=7) == ["export", "evaluate", "report"]
  assert changed(eval__plots=False) == ["evaluate", "report"]
  # speed and logging only: nothing re-runs
  assert changed(synthesis__batch_size=16, stage2__progress_every_secs=1.0, eval__batch_size=8) == []


def test_rerun_with_a_changed_field(tmp_path, recorder, caplog):
  wd = Workdir(str(tmp_path))
  runner.run(demo_config(), wd.root)
  assert recorder == list(stages.STAGES)
  assert json.load(open(wd.config))["synthesis"]["step_size"] == 55.0     # the full resolved config
  done = json.load(open(wd.done("synthesis")))["provenance"]
  assert done["fields"]["synthesis.step_size"] == 55.0 and set(done["upstream"]) == {"models", "data", "sources"}
  recorder.clear()
  runner.run(demo_config(), wd.root)
  assert recorder == []                                                  # same config: all skipped

  c = demo_config()
  c.synthesis.step_size = 20.0
  c.stage2.epochs = 3
  c.on_change = "error"                                                  # refuses, runs nothing
  with pytest.raises(ValueError) as e:
    runner.run(c, wd.root)
  print(e.value)
  assert "synthesis: synthesis.step_size: 55.0 -> 20.0" in str(e.value)
  assert "stage2: stage2.epochs: 10 -> 3; input stage features changed" in str(e.value)
  assert recorder == [] and os.path.exists(os.path.join(wd.synthesis, "made_by_run_4.png"))

  c.on_change = "rerun"
  with caplog.at_level("WARNING"):
    runner.run(c, wd.root)
  assert recorder == ["synthesis", "features", "stage2", "stage3", "export", "evaluate", "report"]
  assert any("stage synthesis: inputs changed since it ran, re-running it (synthesis.step_size: 55.0 -> 20.0)"
             in r.getMessage() for r in caplog.records)
  # the old synthesis output was not reused: the folder holds only what the rerun made
  assert os.listdir(wd.synthesis) == ["made_by_run_1.png"]
  assert json.load(open(wd.config))["synthesis"]["step_size"] == 20.0


def test_killed_stage_resumes_only_with_the_same_inputs(tmp_path, recorder):
  wd = Workdir(str(tmp_path))
  runner.run(demo_config(), wd.root, ["models", "data", "sources", "synthesis"])
  # as if synthesis had been killed: started marker and partial outputs, no done marker
  os.remove(wd.done("synthesis"))
  fps, steps = runner.plan(demo_config(), wd, ["synthesis"])
  assert [(s.stage, s.action) for s in steps] == [("synthesis", "resume")]
  c = demo_config()
  c.synthesis.target = -2.5
  _, steps = runner.plan(c, wd, ["synthesis"])
  assert steps[0].action == "rerun" and steps[0].changes == ["synthesis.target: -1.8 -> -2.5"]
  # a stage whose inputs are stale and not part of this run is refused
  with pytest.raises(ValueError, match=r"stage features needs stage\(s\) \['synthesis', 'negatives'\]"):
    runner.plan(c, wd, ["features"])


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
    runner.run(c, str(tmp_path / "run"))
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
  # synthesis guided by the ResNet-50 needs no CLIP folder (issue 19, case 7); guided by CLIP it does
  c.models.clip_path = str(tmp_path / "no_clip")
  c.synthesis.classifier, c.synthesis.resnet_path = "resnet50", str(clip_dir / "config.json")
  assert [f for f, _, p in inputs.checks(c, ["synthesis"]) if p] == ["models.sd_path", "data.train_root"]
  c.synthesis.classifier = "clip"
  assert [f for f, _, p in inputs.checks(c, ["synthesis"]) if p] == ["models.clip_path", "models.sd_path",
                                                                      "data.train_root"]


def test_bad_values_refused_before_any_stage(tmp_path, recorder):
  """Issue 19, case 5: step_size=-inf deleted the previous good synthesis before the health check
  stopped the run; classifier='clipp' was found after three stages. Now both are one error up front."""
  wd = Workdir(str(tmp_path))
  runner.run(demo_config(), wd.root)
  before = {p: open(p).read() for p in (wd.done("synthesis"), wd.done("report"))}
  recorder.clear()
  c = demo_config()
  c.synthesis.step_size = float("-inf")
  c.synthesis.classifier = "clipp"
  c.stage2.lr = float("nan")
  c.negatives.keep_fraction = 1.5
  c.eval.fpr95_rules.id_positive = "neglable"
  with pytest.raises(values.ConfigValueError) as e:
    runner.run(c, wd.root)
  print(e.value)
  assert str(e.value) == (
      "5 config value(s) are invalid (checked before any stage runs; nothing was changed in the workdir):\n"
      "  config.stage2.lr=nan: not a finite number\n"
      "  config.synthesis.step_size=-inf: not a finite number\n"
      "  config.synthesis.classifier='clipp': not one of 'clip', 'resnet50'\n"
      "  config.eval.fpr95_rules.id_positive='neglable': not one of 'neglabel', 'openood', 'exact'\n"
      "  config.negatives.keep_fraction=1.5: want in (0, 1]")
  assert recorder == [] and os.listdir(wd.synthesis) == ["made_by_run_4.png"]
  assert {p: open(p).read() for p in before} == before
  assert values.problems(demo_config()) == []


def test_failed_rerun_keeps_the_finished_outputs(tmp_path, recorder, monkeypatch, caplog):
  """A rerun writes beside the finished synthesis and swaps at the end: a rerun that fails leaves the
  finished images and done marker as they were; run again, it resumes beside them; at its end they go."""
  wd = Workdir(str(tmp_path))
  runner.run(demo_config(), wd.root)
  done = open(wd.done("synthesis")).read()
  recorder.clear()
  fake = stages.BY_NAME["synthesis"].run

  def failing(ctx):
    fake(ctx)
    raise RuntimeError("health check: too many nonfinite images")
  _replace_run(monkeypatch, "synthesis", failing)
  c = demo_config()
  c.synthesis.target = -2.5
  with pytest.raises(RuntimeError, match="health check"):
    runner.run(c, wd.root)
  assert os.listdir(wd.synthesis) == ["made_by_run_4.png"] and open(wd.done("synthesis")).read() == done
  assert os.listdir(os.path.join(wd.root, "rerun", "synthesis")) == ["made_by_run_1.png"]
  # the old config still finds everything done
  recorder.clear()
  runner.run(demo_config(), wd.root)
  assert recorder == []
  # the new config, with the stage fixed: resumes beside (keeps the first attempt's image), then swaps
  def second(ctx):
    open(os.path.join(ctx.wd.synthesis, "second_attempt.png"), "w").close()
    return fake(ctx)
  _replace_run(monkeypatch, "synthesis", second)
  with caplog.at_level("INFO", logger="absl"):  # absl's own level: an earlier test may have raised it
    infos = runner.run(c, wd.root)
  assert any("stage synthesis: resuming its rerun beside the finished outputs" in r.getMessage()
             for r in caplog.records)
  assert sorted(os.listdir(wd.synthesis)) == ["made_by_run_1.png", "second_attempt.png"]
  assert not os.path.exists(os.path.join(wd.root, "rerun", "synthesis"))
  assert json.load(open(wd.done("synthesis")))["provenance"]["fields"]["synthesis.target"] == -2.5
  assert infos["synthesis"] == json.load(open(wd.done("synthesis")))


def test_interrupted_swap_is_finished_by_the_next_run(tmp_path, recorder):
  wd = Workdir(str(tmp_path))
  runner.run(demo_config(), wd.root)
  new = os.path.join(wd.root, "rerun", "synthesis")
  os.makedirs(new)
  open(os.path.join(new, "new.png"), "w").close()
  info = json.load(open(wd.done("synthesis")))
  info["marker"] = "the rerun's"
  # killed right after the record was written: nothing moved yet
  json.dump({"folders": [wd.synthesis, wd.synthesis_heldout], "made": [wd.synthesis], "done": info},
            open(os.path.join(wd.root, "rerun", "synthesis.swap.json"), "w"))
  recorder.clear()
  runner.run(demo_config(), wd.root)
  assert os.listdir(wd.synthesis) == ["new.png"] and json.load(open(wd.done("synthesis")))["marker"] == "the rerun's"
  assert not os.path.exists(os.path.join(wd.root, "rerun", "synthesis.swap.json"))


def test_demo_never_writes_into_the_users_folder(tmp_path, recorder, monkeypatch):
  """Issue 19, case 3: the demo config with data.train_root=<my folder> wrote its 48 generated JPEGs
  into that folder before the run stopped. Now the demo's images live in the workdir and the pair is
  refused before any stage."""
  user = tmp_path / "my_imagenet"
  (user / "n01440764").mkdir(parents=True)
  (user / "n01440764" / "fish.JPEG").write_bytes(b"mine")
  _replace_run(monkeypatch, "data", stages.make_data)  # the real one, which writes images
  c = demo_config()
  c.data.train_root, c.data.classnames = str(user), "imagenet"
  with pytest.raises(inputs.InputError) as e:
    runner.run(c, str(tmp_path / "run"))
  assert (f"data.train_root='{user}': set together with data.generate: the demo generates its images in "
          "<workdir>/data and never writes into your folders") in str(e.value)
  assert sorted(p.name for p in user.rglob("*")) == ["fish.JPEG", "n01440764"] and recorder == []
  wd = Workdir(str(tmp_path / "run"))
  assert run_context.data_roots(c, wd) == {k: wd.path("data", k) for k in ("train", "val", "ood")}

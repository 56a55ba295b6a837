"""run_report.md from a workdir's files (no models): it links only plots that exist, says which code made
the run, counts unreadable sources, and shows NegLabel's settings only with a NegLabel-style row
(issue 19, cases 2, 4 and 7)."""
import json
import os

from synood_jax.ood import results as tables
from synood_jax.pipeline import run_report
from synood_jax.pipeline.workdir import Workdir


def _results(methods):
  one = {"fpr95": 0.5, "auroc": 0.6, "aupr_in": 0.5, "aupr_out": 0.5}
  return {"methods": {m: {c: {"sun": one, "average": one} for c in ("id_positive", "ood_positive")}
                      for m in methods},
          "ood_sets": ["sun"], "id_set": "id_val", "conventions": ["id_positive", "ood_positive"],
          "header": {"model": "clip", "groups": 100, "temperature": 0.01, "seed": 0, "mcm_temperature": 1.0}}


def _workdir(tmp_path, methods=("mcm", "neglabel", "synood")):
  wd = Workdir(str(tmp_path))
  os.makedirs(wd.eval)
  os.makedirs(os.path.dirname(wd.done("sources")))
  json.dump(_results(methods), open(wd.results, "w"))
  code = {"package": "synood-jax", "version": "0.1.0", "sha256": "feedfacecafe0123", "files": 90,
          "git": {"commit": "2112e9a0aaaa", "dirty": False}}
  json.dump({"synthesis": {"target": -1.8, "classifier": "clip"}, "code": code}, open(wd.config, "w"))
  json.dump({"classes": "4 folders", "skipped": [{"path": "rings/bad.png", "reason": "truncated"}]},
            open(wd.done("sources"), "w"))
  return wd


def test_report_links_only_existing_plots(tmp_path):
  wd = _workdir(tmp_path)
  text = open(run_report.write_run_report(wd)).read()
  assert "## ROC curves" not in text and "plots/" not in text  # eval.plots=False: nothing to link
  os.makedirs(wd.plots)
  for name in ("roc_sun.png", "hist_synood.png"):
    open(os.path.join(wd.plots, name), "wb").close()
  text = open(run_report.write_run_report(wd)).read()
  assert "![ROC sun](eval/plots/roc_sun.png)" in text and "[SynOOD score histogram](eval/plots/hist_synood.png)" in text
  assert "hist_mcm" not in text


def test_report_names_the_code_and_unreadable_sources(tmp_path):
  text = open(run_report.write_run_report(_workdir(tmp_path))).read()
  assert "- Code: synood-jax 0.1.0, sources sha256 feedfacecafe (90 files), git 2112e9a0aa" in text
  assert "1 training image(s) could not be read when the sources were selected and were left out: " \
         "`rings/bad.png` (truncated)." in text


def test_header_shows_neglabel_settings_only_with_such_a_row():
  only_mcm = tables.markdown(_results(["mcm"]))
  assert "NegLabel groups" not in only_mcm and "- MCM temperature: 1.0" in only_mcm
  both = tables.markdown(_results(["mcm", "neglabel"]))
  assert "- NegLabel groups: 100, temperature 0.01, seed 0" in both and "- MCM temperature: 1.0" in both
  assert "MCM temperature" not in tables.markdown(_results(["neglabel"]))

"""The whole SynOOD method, stage by stage, resumable:

  python launch/pipeline.py --config=configs/demo.py --workdir=/tmp/synood_demo
  python launch/pipeline.py --config=configs/imagenet_vitb16.py --workdir=DIR --stages=synthesis
"""
from absl import app, flags
from ml_collections import config_flags

from synood_jax import fileio, runtime
from synood_jax.pipeline import run_report, runner, stages
from synood_jax.pipeline.workdir import Workdir

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Run config file.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/synood_demo", "Where every stage writes.")
_STAGES = flags.DEFINE_list("stages", [], f"Stages to run (default all): {', '.join(stages.STAGES)}.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runtime.setup(_CONFIG.value)
  with runtime.fail_fast():
    infos = runner.run(_CONFIG.value, _WORKDIR.value, _STAGES.value)
  if "report" in infos and fileio.is_writer():  # the table once, in process 0's log
    wd = Workdir(_WORKDIR.value)
    print(run_report.results_section(wd))
    print(f"Report: {wd.report}")


if __name__ == "__main__":
  app.run(main)

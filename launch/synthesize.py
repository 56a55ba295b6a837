"""Stage 1 of SynOOD alone: select sources and synthesize near-boundary OOD images (resumable).

  python launch/synthesize.py --config=configs/imagenet_vitb16.py --workdir=DIR
"""
from absl import app, flags
from ml_collections import config_flags

from synood_jax import runtime
from synood_jax.pipeline import runner

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Run config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output: <workdir>/synthesis/<class>/<name>_ood.JPEG (or .png) + manifest.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runtime.setup(_CONFIG.value)
  with runtime.fail_fast():
    runner.run(_CONFIG.value, _WORKDIR.value, ["models", "data", "sources", "synthesis"])


if __name__ == "__main__":
  app.run(main)

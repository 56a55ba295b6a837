"""Zero-shot OOD evaluation: `python launch/evaluate.py --config=configs/evaluate.py --workdir=DIR`."""
from absl import app, flags
from ml_collections import config_flags

from synood_jax.ood import evaluation
from synood_jax import runtime

_CONFIG = config_flags.DEFINE_config_file("config", "configs/evaluate.py", "Evaluation config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where results, plots and the feature cache go.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  runtime.setup(config)
  evaluation.evaluate_config(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)

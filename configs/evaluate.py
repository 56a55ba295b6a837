"""Zero-shot OOD evaluation of CLIP on ImageNet-1k (MOS benchmark): MCM and NegLabel side by side.

Reproduces the zero-shot rows of SynOOD's Table 1 (NegLabel: average FPR95 25.40 / AUROC 94.21 with
CLIP ViT-B/16; MCM: 42.74 / 90.77). First turn the downloads into checked manifests:

  python launch/prepare_data.py --out_dir=/data/manifests --imagenet_val=/data/imagenet/val \
      --inaturalist=/data/iNaturalist --sun=/data/SUN --places=/data/Places --textures=/data/dtd/images

then:

  python launch/evaluate.py --config=configs/evaluate.py --workdir=/tmp/eval \
      --config.models.clip_path=/models/clip-vit-base-patch16 --config.eval.data_dir=/data/manifests \
      --config.negatives.label_list=/data/neglabel_10499.txt

The config is the whole pipeline's (synood_jax/config.py): the same `models`, `mesh`, `data.classnames`,
`negatives` and `eval` fields a pipeline run's evaluation stage reads. Each method prompts as its paper
does (`eval.templates`: MCM 'a photo of a {}', NegLabel 'the nice {}'), and FPR95 takes each
convention's published operating point (`eval.fpr95_rules`).

Variants: `configs/evaluate.py:runlocal` shrinks batch sizes for a laptop. Sets (`eval.id_set`,
`eval.ood_sets`) are `name` (the manifest `<eval.data_dir>/<name>.jsonl`) or `name=<spec>` with spec a
manifest, an image folder, `list:<file>:<root>` (OpenOOD v1.5 list) or `tfds:<name>:<split>`.
"""
from synood_jax.config import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.models.clip_path = "/models/clip-vit-base-patch16"
  c.eval.scores = "mcm,neglabel"        # the zero-shot rows of Table 1
  if arg == "runlocal":
    c.eval.batch_size = 16
    c.eval.text_batch_size = 64
    c.eval.score_batch_size = 512
  return c

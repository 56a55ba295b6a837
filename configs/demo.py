"""The README's main job: every stage of SynOOD on 2 CPU cores in a few minutes.

Tiny random CLIP and SD-2-in-painting models are created, saved in HF / diffusers format and loaded back
through the normal path; a generated image set has 4 ID classes and 2 held-out OOD classes. With random
models the numbers say nothing about the paper: the demo shows that every stage runs, resumes and reports.

  python launch/pipeline.py --config=configs/demo.py --workdir=/tmp/synood_demo
"""
from synood_jax.config import base_config

NOUNS = ("pebble lantern harbor violin orchard glacier teapot compass meadow anchor quilt saddle canyon "
         "kettle beacon thimble ladder walrus cactus mitten tornado vineyard trumpet igloo puddle "
         "chimney falcon barrel comet fossil gazebo hammock iceberg jigsaw kayak lagoon marble nectar "
         "oasis pagoda").split()
ADJECTIVES = "fuzzy gleaming rusty velvet frosty murky glossy dusty brittle woolly soggy jagged".split()


def get_config(arg: str | None = None):
  c = base_config()
  c.data.classnames = "folders"
  c.data.generate.image_size = 48
  c.data.generate.train_per_class = 12
  c.data.generate.val_per_class = 6
  c.data.generate.id_classes = {"stripes": ("stripes", 0.05), "rings": ("rings", 0.3),
                                "checks": ("checks", 0.55), "blobs": ("blobs", 0.8)}
  c.data.generate.ood_classes = {"waves": ("waves", 0.15), "dots": ("dots", 0.65)}
  c.data.generate.nouns = NOUNS
  c.data.generate.adjectives = ADJECTIVES
  c.sources.per_class = 8
  c.synthesis.image_size = 32           # the tiny VAE: 16x16 latents
  c.synthesis.target = -1.8             # 4 classes: s <= -log 4 = -1.39
  # The demo has no ResNet-50: CLIP zero-shot guidance over its 4 classes. It keeps the per-image step
  # it was tuned with (r = 10 under the old dL/dz0 update = 55 in the official dL/du units), and PNG
  # keeps its 32 px images free of JPEG blocks.
  c.synthesis.classifier = "clip"
  c.synthesis.reference_batch = 1
  c.synthesis.step_size = 55.0
  c.synthesis.image_format = "png"
  c.synthesis.log_every_secs = 5.0
  c.negatives.keep_fraction = 0.5
  for stage in (c.stage2, c.stage3):
    stage.batch_size = 16
    stage.checkpoint_every = 4
    stage.progress_every_secs = 5.0
  c.stage2.epochs = 10
  c.stage3.epochs = 10
  c.stage3.lr = 5e-4                    # the tiny encoder's synthetic features lie close together
  c.stage3.keep_epoch = 0               # the demo keeps the last epoch (the paper: 1)
  c.eval.groups = 4
  c.eval.batch_size = 32
  c.eval.text_batch_size = 64
  c.eval.score_batch_size = 256
  return c

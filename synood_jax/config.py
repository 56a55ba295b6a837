"""The configuration of a whole SynOOD run: the paper's setting, which the config files start from."""
import os

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.on_change = "rerun"                 # a finished stage whose config fields changed: 'rerun' it, or 'error'
  c.compile_cache_dir = os.path.expanduser("~/.cache/synood_jax/xla")  # '' turns the cache off
  c.multi_host = False                  # jax.distributed.initialize() on a pod / multi-node mesh
  # An explicit cluster, for machines jax cannot auto-detect (Cloud TPU, Slurm, Open MPI, Kubernetes
  # are detected). Empty ('' / -1) = auto-detect; setting coordinator_address implies multi_host.
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="",             # 'host:port' where process 0 listens
      num_processes=-1,                   # how many processes make the job
      process_id=-1,                      # this process: 0 .. num_processes - 1
      initialization_timeout=300,         # seconds to wait for every process to join
  ))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  # (regex over param paths 'unet/down_blocks_0/.../kernel', tactic): first match wins, unmatched
  # params are replicated; tactics are named in parallel.TACTICS ('fsdp', 'replicate').
  c.mesh.sharding_rules = ((".*", "fsdp"),)

  c.models = ml_collections.ConfigDict()
  c.models.clip_path = ""               # HF CLIP folder (openai/clip-vit-base-patch16); '' makes a tiny one
  c.models.sd_path = ""                 # diffusers stabilityai/stable-diffusion-2-inpainting; '' makes a tiny one
  c.models.dtype = "float32"            # networks; latents and scheduler stay float32
  # Attention kernel of every network (models/attention.py): 'auto' = cuDNN flash on GPU, Pallas flash on
  # TPU, the cache-sized XLA loop on CPU; or force 'xla', 'xla_loop', 'cudnn', 'pallas_tpu'. Speed only:
  # no stage reruns when it changes.
  c.models.attention = "auto"
  c.models.tiny_clip = ml_collections.ConfigDict()

  c.data = ml_collections.ConfigDict()
  c.data.train_root = ""                # ImageNet-1k train: <root>/<wnid>/<file>.JPEG
  c.data.val_root = ""
  c.data.classnames = "imagenet"        # CLIP-cleaned names; 'folders' = the class folder names; or a file
  c.data.generate = ml_collections.ConfigDict()  # the demo's generated image set (empty: none)

  c.sources = ml_collections.ConfigDict(dict(per_class=50))

  c.context = ml_collections.ConfigDict()
  c.context.answers_file = ""           # MLLM answers (LLaVA JSONL or {path: text} JSONL)
  c.context.template = "A photo only remain {context}."
  c.context.max_chars = 73
  c.context.policy = "fallback"         # a source without an answer: 'skip' or the fallback prompt
  c.context.fallback_prompt = "A photo only remain the background."

  # The official procedure (generate_near_ood_sample.py with its shell script's values).
  c.synthesis = ml_collections.ConfigDict()
  c.synthesis.seed = 0                  # noise of each image: (seed, source id)
  c.synthesis.image_size = 512
  c.synthesis.steps = 20
  c.synthesis.strength = 0.6
  c.synthesis.guidance_scale = 8.0
  c.synthesis.scheduler = ""            # '' = the folder's (PNDM for SD-2 in-painting)
  c.synthesis.iterations = 3            # K
  c.synthesis.step_size = 10.0          # r in eps <- eps - r dL/du, u = z0 / scaling_factor (the official r)
  c.synthesis.target = -5.0             # m
  c.synthesis.loss = "squared"          # 'squared' (m - s)^2, 'hinge', 'msp_kl'
  c.synthesis.grad_mode = "skip"        # 'skip' (official dL/du) or 'exact' (pulled back through the sampler)
  c.synthesis.reference_batch = 2       # the official loss averages over its batch of 2; 1: per-image steps
  # in_distribution: s_K < m* - band and below half way from s_0 to m* = min(m, -log C) (health.py)
  c.synthesis.band = 2.0
  c.synthesis.max_not_ok = 0.05         # stop when more than this share failed (nonfinite, degenerate)
  c.synthesis.min_pixel_std = 0.01      # an image with a smaller pixel std (in [0, 1]) is degenerate
  c.synthesis.batch_size = 8            # global; a multiple of the device count
  c.synthesis.decode_chunk = 0          # VAE-decode this many rows at a time (0: all)
  c.synthesis.classifier = "resnet50"   # torchvision ResNet-50 (official), or 'clip' zero-shot over the ID prompts
  c.synthesis.clip_logit_scale = 100.0
  c.synthesis.resnet_path = ""          # torchvision resnet50 IMAGENET1K_V2 state dict (.pth / .safetensors)
  c.synthesis.image_format = "jpeg"     # '<name>_ood.JPEG' via PIL (official, lossy) or 'png' (lossless)
  c.synthesis.jpeg_quality = 75         # PIL's default, which the official script gets
  c.synthesis.log_every_secs = 30.0

  c.negatives = ml_collections.ConfigDict()  # NegLabel's negatives: the pipeline and the evaluation read these
  c.negatives.label_list = ""           # NegLabel's published list, or ours; '' = mine from the corpus
  c.negatives.corpus = ""               # WordNet dict folder, or 'nouns.txt,adjectives.txt'
  c.negatives.percentile = 0.95
  c.negatives.keep_fraction = 0.15

  # True drops the in_distribution images from pseudo-labelling; the official code keeps every image
  # (failed ones are never kept).
  c.pseudo = ml_collections.ConfigDict(dict(drop_flagged=False))
  c.stage2 = stage2_config()
  c.stage3 = stage3_config()

  # The evaluation (ood.evaluation.Options has the same fields); the model is models.clip_path /
  # models.dtype, the classes data.classnames, the mesh `mesh`, the negatives `negatives`.
  c.eval = ml_collections.ConfigDict()
  c.eval.data_dir = ""                  # prepared manifests (launch/prepare_data.py)
  c.eval.id_set = "imagenet_val"
  c.eval.ood_sets = "inaturalist,sun,places,textures"
  c.eval.scores = "mcm,neglabel"
  c.eval.templates = ml_collections.ConfigDict(dict(  # each method's ID prompts, as its paper
      mcm="mcm",                        # 'a photo of a {}'
      neglabel="neglabel"))             # 'the nice {}' (also SynOOD's training and guidance prompts)
  c.eval.groups = 100
  c.eval.temperature = 0.01
  c.eval.seed = 0
  c.eval.mcm_temperature = 1.0
  c.eval.fpr95_rules = ml_collections.ConfigDict(dict(  # operating point per convention (ood.metrics)
      id_positive="neglabel",           # MOS / MCM / NegLabel: recall nearest 0.95
      ood_positive="openood"))          # OpenOOD v1.5: sklearn roc_curve, first TPR >= 0.95
  c.eval.batch_size = 256
  c.eval.text_batch_size = 1000
  c.eval.score_batch_size = 4096
  c.eval.num_threads = 0
  c.eval.cache_dir = ""
  c.eval.allow_partial = False
  c.eval.verify = "exists"
  c.eval.plots = True
  return c


def _training_config(**kw) -> ml_collections.ConfigDict:
  """Fields stages 2 and 3 share (their loop is `train.loop`)."""
  c = ml_collections.ConfigDict()
  c.batch_size = 128           # global batch; must be a multiple of the device count
  c.logit_scale = 100.0        # CLIP's logit_scale.exp()
  c.weight_decay = 1e-5        # L2 added to the gradient before the optimiser (torch semantics)
  c.seed = 0                   # data order (and stage-2 init)
  c.checkpoint_every = 500     # steps; epoch ends are always saved as well
  c.max_to_keep = 2
  c.progress_every_secs = 30.0
  c.tensorboard = False        # needs tensorboardX (the 'tensorboard' extra)
  c.update(kw)
  return c


def stage2_config() -> ml_collections.ConfigDict:
  """Stage 2 (`ind_ood_projection.py`): residual Linear-LayerNorm-ReLU projection, Adam, 3 epochs."""
  return _training_config(
      epochs=3,
      lr=1e-3,
      eta_min=1e-5,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      layernorm_eps=1e-5,
      normalize_inputs=False,   # official: raw CLIP image embeddings go into the projection
  )


def stage3_config() -> ml_collections.ConfigDict:
  """Stage 3 (`ood_label_finetuning.py`): trainable negative text features, SGD momentum, 5 epochs."""
  return _training_config(
      epochs=5,
      lr=2e-2,
      eta_min=0.0,              # torch CosineAnnealingLR default, as in the official script
      momentum=0.9,
      keep_epoch=1,             # features after this many epochs are returned (official: epoch_0.pth)
  )

"""Check local downloads and write dataset manifests before any evaluation.

  python launch/prepare_data.py --out_dir=/data/manifests --imagenet_val=/data/imagenet/val \
      --inaturalist=/data/iNaturalist --sun=/data/SUN --places=/data/Places --textures=/data/dtd/images
  python launch/prepare_data.py --out_dir=/data/openood --openood_lists=/data/benchmark_imglist/imagenet \
      --openood_root=/data/images_largescale --openood_sets=imagenet_id=test_imagenet.txt,ssb_hard=test_ssb_hard.txt \
      --openood_id=imagenet_id

ImageNet val as extracted from its tar (one flat folder of 50,000 JPEGs) is sorted into wnid folders first:
  python launch/prepare_data.py --sort_val=/data/imagenet/val --val_labels=/data/LOC_val_solution.csv
(labels: Kaggle's LOC_val_solution.csv, '<file> <wnid or class index>' lines, or one wnid per line).

Every missing or unreadable file is reported by path (and in <out_dir>/prepare_report.json); a count
that differs from the expected one (10,000 iNaturalist/SUN/Places, 5,640 Textures, 50,000 ImageNet val,
the number of lines of an OpenOOD list) is an error unless --allow_partial.
"""
from absl import app, flags

from synood_jax.data import prepare

_OUT = flags.DEFINE_string("out_dir", None, "Where manifests (<set>.jsonl), index.json and the report go.")
_SORT_VAL = flags.DEFINE_string("sort_val", None, "A flat ImageNet val folder to sort into wnid subfolders "
                                "(in place), given --val_labels.")
_VAL_LABELS = flags.DEFINE_string("val_labels", None, "Val labels file for --sort_val.")
_IMAGENET = flags.DEFINE_string("imagenet_val", None, "ImageNet val folder (1000 class subfolders).")
_INAT = flags.DEFINE_string("inaturalist", None, "MOS iNaturalist OOD folder.")
_SUN = flags.DEFINE_string("sun", None, "MOS SUN OOD folder.")
_PLACES = flags.DEFINE_string("places", None, "MOS Places OOD folder.")
_TEXTURES = flags.DEFINE_string("textures", None, "Textures (DTD) images folder.")
_LISTS = flags.DEFINE_string("openood_lists", None, "Folder of OpenOOD v1.5 image lists.")
_ROOT = flags.DEFINE_string("openood_root", None, "Image root the OpenOOD list paths are relative to.")
_SETS = flags.DEFINE_list("openood_sets", [], "name=list_file pairs (list files relative to --openood_lists).")
_ID = flags.DEFINE_list("openood_id", [], "OpenOOD set names that are ID (labels kept); others are OOD.")
_PARTIAL = flags.DEFINE_bool("allow_partial", False, "Write manifests despite missing files or wrong counts.")
_VERIFY = flags.DEFINE_enum("verify", "header", ["exists", "header", "decode"], "How hard to check each file.")
_THREADS = flags.DEFINE_integer("num_threads", 0, "Checking threads (0: automatic).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _SORT_VAL.value:
    if not _VAL_LABELS.value:
      raise app.UsageError("--sort_val needs --val_labels")
    counts = prepare.sort_flat_val(_SORT_VAL.value, _VAL_LABELS.value)
    print(f"{_SORT_VAL.value}: {sum(counts.values())} images sorted into {len(counts)} wnid folders")
    if not _OUT.value:
      return
  if not _OUT.value:
    raise app.UsageError("--out_dir is required")
  specs = prepare.mos_specs(_IMAGENET.value, _INAT.value, _SUN.value, _PLACES.value, _TEXTURES.value)
  if _SETS.value:
    if not (_LISTS.value and _ROOT.value):
      raise app.UsageError("--openood_sets needs --openood_lists and --openood_root")
    pairs = dict(s.split("=", 1) for s in _SETS.value)
    specs += prepare.openood_specs(_LISTS.value, _ROOT.value, pairs, _ID.value)
  if not specs:
    raise app.UsageError("nothing to prepare: give at least one dataset folder or --openood_sets")
  report = prepare.prepare(specs, _OUT.value, allow_partial=_PARTIAL.value, verify=_VERIFY.value,
                           num_threads=_THREADS.value or None)
  for name, info in report.sets.items():
    print(f"{name}: {info['count']} images -> {info['manifest']}")


if __name__ == "__main__":
  app.run(main)

"""NegLabel negative-label mining: corpus readers, mining, label-list files, pseudo-labels.

Mining (NegLabel, ICLR 2024): d(w) = quantile_{0.95}({cos(e(w), e(c)) : c in ID}); per part of speech
keep the int(len * 0.15) candidates with the smallest d (ascending, stable sort). Pseudo-labels
(SynOOD `ood_label_mining.py`): y(x) = argmax_j 100 * cos(f(x), t_j) over the negatives only.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

NOUN_TEMPLATE = "the nice {}"
ADJ_TEMPLATE = "This is a {} photo"
ID_TEMPLATE = "the nice {}"

# WordNet 3.0 lexicographer files, in file-number order (lexnames(5WN)); Debian's wordnet-base lacks
# the `lexnames` file that nltk's reader opens, so it is supplied from here when absent.
_LEXNAMES = (["adj.all", "adj.pert", "adv.all"]
             + ["noun." + n for n in (
                 "Tops act animal artifact attribute body cognition communication event feeling food "
                 "group location motive object person phenomenon plant possession process quantity "
                 "relation shape state substance time").split()]
             + ["verb." + n for n in (
                 "body change cognition communication competition consumption contact creation emotion "
                 "motion perception possession social stative weather").split()]
             + ["adj.ppl"])
_SYNTACTIC = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
LEXNAMES_TEXT = "".join(f"{i:02d}\t{n}\t{_SYNTACTIC[n.split('.')[0]]}\n" for i, n in enumerate(_LEXNAMES))


@dataclasses.dataclass
class NegativeLabels:
  labels: list[str]          # the word, e.g. 'spleenwort'
  prompts: list[str]         # the text encoded, e.g. 'the nice spleenwort'
  pos: list[str]             # 'noun' | 'adj' | 'unknown'
  distances: np.ndarray      # float64 [L]: 0.95-quantile cosine to the ID prompts (NaN if unknown)

  def __len__(self) -> int:
    return len(self.labels)


def _normalize_word(w: str) -> str:
  return w.replace("_", " ").strip().lower()


def _dedup(words) -> list[str]:
  return list(dict.fromkeys(w for w in words if w))


def open_wordnet(folder: str):
  """nltk's WordNetCorpusReader on a WordNet database folder (data.noun, index.noun, ...).

  The folder is added to nltk.data.path (nltk only opens corpora there); a missing `lexnames`
  (Debian's wordnet-base) is supplied from WordNet 3.0's table; no OMW mapping is loaded.
  """
  import nltk
  from nltk.corpus.reader.wordnet import WordNetCorpusReader

  root = os.path.realpath(folder)
  for f in ("data.noun", "data.adj", "index.noun", "index.adj"):
    if not os.path.isfile(os.path.join(root, f)):
      raise FileNotFoundError(f"open_wordnet: {os.path.join(root, f)} missing: not a WordNet database")
  if root not in nltk.data.path:
    nltk.data.path.append(root)

  class _Reader(WordNetCorpusReader):
    def open(self, file):
      if file == "lexnames" and not os.path.isfile(os.path.join(root, "lexnames")):
        return io.StringIO(LEXNAMES_TEXT)
      return super().open(file)

    def map_wn(self, version="wordnet"):  # no mapping to nltk's own WordNet copy (OMW only)
      return None

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "multilingual functions are not available"
    return _Reader(root, None)


def read_wordnet(folder, noun_files: Sequence[str] | None = None,
                 adj_files: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
  """(nouns, adjectives) from a WordNet database folder (or an `open_wordnet` reader), via nltk.

  Every lemma name of every synset (adjectives: head and satellite synsets), '_' -> ' ',
  lower-cased (NegLabel's published list is lower-case), de-duplicated, sorted. A word that is
  both a noun and an adjective is kept as a noun only (NegLabel de-duplicates across its files).
  `noun_files` / `adj_files` restrict to lexicographer files, e.g. ['noun.plant', 'adj.ppl'].
  """
  reader = open_wordnet(folder) if isinstance(folder, (str, os.PathLike)) else folder

  def words(tag: str, files) -> set[str]:  # tag 'a' yields head and satellite adjectives
    out = {_normalize_word(lemma) for synset in reader.all_synsets(tag)
           if files is None or synset.lexname() in files for lemma in synset.lemma_names()}
    out.discard("")
    return out

  nouns = words("n", None if noun_files is None else set(noun_files))
  adjs = words("a", None if adj_files is None else set(adj_files)) - nouns
  return sorted(nouns), sorted(adjs)


def _read_lines(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f]


def read_word_lists(noun_file: str, adj_file: str) -> tuple[list[str], list[str]]:
  """(nouns, adjectives) from two text files, one word per line, as NegLabel's txtfiles/.

  Lines stripped, empty lines skipped, de-duplicated keeping first occurrence (case kept); a word
  in both files is kept as a noun only.
  """
  nouns = _dedup(_read_lines(noun_file))
  noun_set = set(nouns)
  adjs = [w for w in _dedup(_read_lines(adj_file)) if w not in noun_set]
  return nouns, adjs


def _encode(encode_text_fn: Callable, prompts: list[str], what: str) -> np.ndarray:
  feats = np.asarray(encode_text_fn(prompts), dtype=np.float64)
  if feats.ndim != 2 or feats.shape[0] != len(prompts):
    raise ValueError(f"mine_negative_labels: encode_text_fn gave shape {feats.shape} for "
                     f"{len(prompts)} {what} prompts; expected [{len(prompts)}, D]")
  return feats


def mine_negative_labels(encode_text_fn: Callable[[list[str]], np.ndarray], id_classnames: Sequence[str],
                         nouns: Sequence[str], adjectives: Sequence[str], percentile: float = 0.95,
                         keep_fraction: float = 0.15, batch_size: int = 1000,
                         noun_template: str = NOUN_TEMPLATE, adj_template: str = ADJ_TEMPLATE,
                         id_template: str = ID_TEMPLATE) -> NegativeLabels:
  """NegLabel mining: d(w) = quantile_q(cos(e(prompt(w)), e(prompt(ID)))), keep int(n * f) smallest per POS.

  `encode_text_fn(list[str]) -> [N, D]` L2-normalised. Candidates equal (case-insensitively) to an
  ID class name are removed first (NegLabel only does this with its `pos_topk` option). Quantile:
  numpy's default linear interpolation (= torch.quantile's). Ties in d keep corpus order (stable
  sort; torch.argsort in NegLabel is not stable). Output: kept nouns by ascending d, then adjectives.
  """
  id_names = {_normalize_word(c) for c in id_classnames}
  id_prompts = [id_template.format(c) for c in id_classnames]
  id_feats = np.concatenate([_encode(encode_text_fn, id_prompts[i:i + batch_size], "ID")
                             for i in range(0, len(id_prompts), batch_size)])
  labels, prompts, pos, dists = [], [], [], []
  for tag, words, template in (("noun", nouns, noun_template), ("adj", adjectives, adj_template)):
    words = [w for w in words if _normalize_word(w) not in id_names]
    if not words:
      continue
    word_prompts = [template.format(w) for w in words]
    d = []
    for i in range(0, len(words), batch_size):  # one batch of features in memory at a time
      feats = _encode(encode_text_fn, word_prompts[i:i + batch_size], tag)
      if feats.shape[1] != id_feats.shape[1]:
        raise ValueError(f"mine_negative_labels: {tag} features have D={feats.shape[1]}, ID features "
                         f"D={id_feats.shape[1]}")
      d.append(np.quantile(feats @ id_feats.T, percentile, axis=1))
    d = np.concatenate(d)
    keep = np.argsort(d, kind="stable")[:int(len(words) * keep_fraction)]
    labels += [words[i] for i in keep]
    prompts += [word_prompts[i] for i in keep]
    pos += [tag] * len(keep)
    dists.append(d[keep])
  distances = np.concatenate(dists) if dists else np.zeros(0)
  return NegativeLabels(labels, prompts, pos, distances)


def load_or_mine(encode_text_fn: Callable[[list[str]], np.ndarray], id_classnames: Sequence[str], *,
                 label_list: str = "", corpus: str = "", percentile: float = 0.95,
                 keep_fraction: float = 0.15, id_template: str = ID_TEMPLATE
                 ) -> tuple[NegativeLabels, dict] | None:
  """NegLabel's negative labels as configured: the list `label_list` if given (`load_label_list`),
  else mined (`mine_negative_labels`) from `corpus`, a WordNet database folder or
  'nouns.txt,adjectives.txt'; None when neither is given. Returns (labels, provenance)."""
  if label_list:
    return load_label_list(label_list), {"label_list": label_list}
  if not corpus:
    return None
  if "," in corpus:
    nouns, adjs = read_word_lists(*[c.strip() for c in corpus.split(",", 1)])
  else:
    nouns, adjs = read_wordnet(corpus)
  labels = mine_negative_labels(encode_text_fn, id_classnames, nouns, adjs, percentile=percentile,
                                keep_fraction=keep_fraction, id_template=id_template)
  return labels, {"corpus": corpus, "nouns": len(nouns), "adjectives": len(adjs), "percentile": percentile,
                  "keep_fraction": keep_fraction}


FORMAT = "synood_jax.labels.negative_labels/v1"


def write_label_list(path: str, result: NegativeLabels, provenance: dict) -> None:
  """JSON {format, provenance (corpus, model, parameters, ...), counts, labels: [{label, prompt, pos, distance}]}."""
  counts = {t: result.pos.count(t) for t in sorted(set(result.pos))}
  rows = [dict(label=l, prompt=p, pos=t, distance=None if np.isnan(d) else float(d))
          for l, p, t, d in zip(result.labels, result.prompts, result.pos, result.distances)]
  with open(path, "w", encoding="utf-8") as f:
    json.dump(dict(format=FORMAT, provenance=provenance, counts=counts, labels=rows), f, indent=1)


_NOUN_RE = re.compile(r"^the nice (.+)$")
_ADJ_RE = re.compile(r"^This is a (.+) photo$")


def load_label_list(path: str) -> NegativeLabels:
  """Our JSON (write_label_list), or plain text with one label or prompt per line.

  Plain lines 'the nice X' are nouns X, 'This is a X photo' adjectives X (NegLabel's published
  list); any other line is its own label and prompt, pos 'unknown'. Distances are NaN.
  """
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if text.lstrip().startswith("{"):
    data = json.loads(text)
    if data.get("format") != FORMAT or "labels" not in data:
      raise ValueError(f"load_label_list: {path} is JSON but not {FORMAT} (key 'format'/'labels')")
    rows = data["labels"]
    return NegativeLabels([r["label"] for r in rows], [r["prompt"] for r in rows], [r["pos"] for r in rows],
                          np.array([np.nan if r["distance"] is None else r["distance"] for r in rows],
                                   dtype=np.float64))
  labels, prompts, pos = [], [], []
  for line in text.splitlines():
    line = line.strip()
    if not line:
      continue
    noun, adj = _NOUN_RE.match(line), _ADJ_RE.match(line)
    label, tag = (noun.group(1), "noun") if noun else (adj.group(1), "adj") if adj else (line, "unknown")
    labels.append(label)
    pos.append(tag)
    prompts.append(line)
  if not labels:
    raise ValueError(f"load_label_list: {path} has no labels")
  return NegativeLabels(labels, prompts, pos, np.full(len(labels), np.nan))


@jax.jit
def _argmax_neg(img: jax.Array, neg_text: jax.Array) -> jax.Array:
  # y = argmax_j 100 * img . neg_j  (softmax is monotone, so argmax of logits = argmax of softmax)
  return jnp.argmax(100.0 * img @ neg_text.T, axis=-1)


def pseudo_labels(syn_img_feats, neg_text_feats, batch: int = 1024) -> np.ndarray:
  """y[n] = argmax_j 100 * cos(syn_img[n], neg_j), in jitted batches of `batch` rows (last one padded)."""
  from synood_jax.parallel import pad_batch
  img = np.asarray(syn_img_feats, dtype=np.float32)
  neg = jnp.asarray(neg_text_feats, dtype=jnp.float32)
  if img.ndim != 2 or neg.ndim != 2 or img.shape[1] != neg.shape[1]:
    raise ValueError(f"pseudo_labels: image features {img.shape} and negative text features "
                     f"{neg.shape} must be [N, D] and [M, D]")
  out = []
  for i in range(0, img.shape[0], batch):
    rows, n = pad_batch(img[i:i + batch], batch)
    out.append(np.asarray(_argmax_neg(rows, neg))[:n])
  return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def write_pseudo_labels(path: str, image_ids: Sequence, labels, label_names: Sequence[str]) -> int:
  """Write image id -> (label index, label name); '.jsonl': one object a line, else one JSON object.

  Returns the number of distinct labels used.
  """
  labels = np.asarray(labels).reshape(-1)
  if len(image_ids) != labels.size:
    raise ValueError(f"write_pseudo_labels: {len(image_ids)} image ids but {labels.size} labels")
  if labels.size and (labels.min() < 0 or labels.max() >= len(label_names)):
    raise ValueError(f"write_pseudo_labels: label index outside [0, {len(label_names)})")
  rows = [dict(image=str(i), label=int(y), name=label_names[int(y)]) for i, y in zip(image_ids, labels)]
  with open(path, "w", encoding="utf-8") as f:
    if path.endswith(".jsonl"):
      f.writelines(json.dumps(r) + "\n" for r in rows)
    else:
      json.dump({r["image"]: dict(label=r["label"], name=r["name"]) for r in rows}, f, indent=1)
  return int(np.unique(labels).size)

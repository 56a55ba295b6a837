"""negative_labels.py: corpus readers, mining vs an independent numpy reference, files, pseudo-labels."""
import hashlib
import json
import math
import os

import numpy as np
import pytest

from synood_jax.labels import negative_labels as nl

D = 24
WORDNET = "/usr/share/wordnet"


def fake_encode(prompts):
  """Deterministic unit vector per prompt, seeded by its SHA-256."""
  rows = []
  for p in prompts:
    seed = int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).normal(size=D)
    rows.append(v / np.linalg.norm(v))
  return np.stack(rows).astype(np.float32)


ID_NAMES = [f"class {i}" for i in range(40)] + ["Goldfish", "tiger"]
NOUNS = [f"noun {i}" for i in range(230)] + ["goldfish", "Tiger"]  # the last two are ID names
ADJS = [f"adj {i}" for i in range(67)]


def reference_mining(id_names, nouns, adjs):
  """Independent reference: explicit loops, np.percentile, lexsort tie-break on corpus index."""
  id_lower = [c.lower() for c in id_names]
  id_feats = fake_encode(["the nice " + c for c in id_names]).astype(np.float64)
  picked = []
  for words, template in ((nouns, "the nice {}"), (adjs, "This is a {} photo")):
    words = [w for w in words if w.lower() not in id_lower]
    dist = []
    for w in words:
      e = fake_encode([template.format(w)])[0].astype(np.float64)
      dist.append(np.percentile([float(e @ c) for c in id_feats], 95))
    order = np.lexsort((np.arange(len(words)), np.array(dist)))
    picked += [words[i] for i in order[: math.floor(len(words) * 0.15)]]
  return picked


@pytest.fixture(scope="module")
def mined():
  return nl.mine_negative_labels(fake_encode, ID_NAMES, NOUNS, ADJS, batch_size=50)


def test_mining_matches_reference(mined):
  assert mined.labels == reference_mining(ID_NAMES, NOUNS, ADJS)
  assert mined.pos == ["noun"] * 34 + ["adj"] * 10  # int(230 * .15) = 34, int(67 * .15) = 10
  assert mined.prompts[0] == f"the nice {mined.labels[0]}"
  assert mined.prompts[-1] == f"This is a {mined.labels[-1]} photo"
  assert "goldfish" not in mined.labels and "Tiger" not in mined.labels
  assert np.all(np.diff(mined.distances[:34]) >= 0) and np.all(np.diff(mined.distances[34:]) >= 0)
  other = nl.mine_negative_labels(fake_encode, ID_NAMES, NOUNS, ADJS, batch_size=7)
  assert other.labels == mined.labels
  np.testing.assert_allclose(other.distances, mined.distances, atol=1e-12)


def test_mining_bad_encoder():
  with pytest.raises(ValueError, match="shape"):
    nl.mine_negative_labels(lambda p: fake_encode(p)[:1], ID_NAMES, NOUNS, ADJS)


def test_label_list_roundtrip(mined, tmp_path):
  path = str(tmp_path / "neg.json")
  prov = dict(corpus="synthetic", model="fake_encode", parameters=dict(percentile=0.95, keep_fraction=0.15))
  nl.write_label_list(path, mined, prov)
  with open(path) as f:
    data = json.load(f)
  assert data["provenance"] == prov and data["counts"] == {"adj": 10, "noun": 34}
  back = nl.load_label_list(path)
  assert (back.labels, back.prompts, back.pos) == (mined.labels, mined.prompts, mined.pos)
  np.testing.assert_array_equal(back.distances, mined.distances)


def test_load_plain_text(tmp_path):
  path = tmp_path / "neg.txt"
  path.write_text("the nice yellow clintonia\n\nThis is a bumpy photo\nspleenwort\n")
  got = nl.load_label_list(str(path))
  assert got.labels == ["yellow clintonia", "bumpy", "spleenwort"]
  assert got.pos == ["noun", "adj", "unknown"]
  assert got.prompts == ["the nice yellow clintonia", "This is a bumpy photo", "spleenwort"]
  assert np.all(np.isnan(got.distances))
  bad = tmp_path / "bad.json"
  bad.write_text('{"labels": 3}')
  with pytest.raises(ValueError, match="bad.json"):
    nl.load_label_list(str(bad))


def test_read_word_lists(tmp_path):
  (tmp_path / "noun.txt").write_text("dog\ncat\n\ndog\n red \n")
  (tmp_path / "adj.txt").write_text("red\nbumpy\nbumpy\nstriped\n")
  nouns, adjs = nl.read_word_lists(str(tmp_path / "noun.txt"), str(tmp_path / "adj.txt"))
  assert nouns == ["dog", "cat", "red"]
  assert adjs == ["bumpy", "striped"]


@pytest.mark.skipif(not os.path.isfile(os.path.join(WORDNET, "data.noun")),
                    reason="WordNet database absent (apt-get install wordnet-base)")
def test_read_wordnet():
  reader = nl.open_wordnet(WORDNET)
  nouns, adjs = nl.read_wordnet(reader)
  assert len(nouns) == 117798 and len(adjs) == 18341  # WordNet 3.0 lemma strings, as documented
  noun_set, adj_set = set(nouns), set(adjs)
  assert {"spleenwort", "hot dog", "dog"} <= noun_set and {"bumpy", "striped"} <= adj_set
  assert not noun_set & adj_set and "red" in noun_set and "red" not in adj_set
  assert all("_" not in w and w == w.lower() for w in nouns + adjs)
  plants, ppl = nl.read_wordnet(reader, noun_files=["noun.plant"], adj_files=["adj.ppl"])
  assert "spleenwort" in plants and "dog" not in plants and "avenged" in ppl and "bumpy" not in ppl
  with pytest.raises(FileNotFoundError, match="data.noun"):
    nl.open_wordnet("/nonexistent")


def test_pseudo_labels_and_writer(tmp_path):
  img = fake_encode([f"img {i}" for i in range(37)])
  neg = fake_encode([f"neg {i}" for i in range(11)])
  got = nl.pseudo_labels(img, neg, batch=16)
  np.testing.assert_array_equal(got, np.argmax(100.0 * img.astype(np.float64) @ neg.T.astype(np.float64), axis=1))
  names = [f"n{j}" for j in range(11)]
  ids = [f"syn/{i:03d}.png" for i in range(37)]
  n = nl.write_pseudo_labels(str(tmp_path / "p.jsonl"), ids, got, names)
  assert n == len(set(got.tolist()))
  rows = [json.loads(l) for l in (tmp_path / "p.jsonl").read_text().splitlines()]
  assert rows[5] == dict(image=ids[5], label=int(got[5]), name=names[got[5]])
  nl.write_pseudo_labels(str(tmp_path / "p.json"), ids, got, names)
  assert json.loads((tmp_path / "p.json").read_text())[ids[0]] == dict(label=int(got[0]), name=names[got[0]])
  with pytest.raises(ValueError, match="37 image ids"):
    nl.write_pseudo_labels(str(tmp_path / "q.json"), ids, got[:3], names)


def test_load_or_mine_one_rule_for_list_or_corpus(tmp_path):
  (tmp_path / "nouns.txt").write_text("\n".join(NOUNS) + "\n")
  (tmp_path / "adjs.txt").write_text("\n".join(ADJS) + "\n")
  corpus = f"{tmp_path / 'nouns.txt'},{tmp_path / 'adjs.txt'}"
  labels, prov = nl.load_or_mine(fake_encode, ID_NAMES, corpus=corpus)
  assert labels.labels == reference_mining(ID_NAMES, NOUNS, ADJS)
  assert prov == {"corpus": corpus, "nouns": len(NOUNS), "adjectives": len(ADJS), "percentile": 0.95,
                  "keep_fraction": 0.15}
  (tmp_path / "list.txt").write_text("the nice cloud\nThis is a dark photo\n")
  never = lambda prompts: pytest.fail("a given list is not mined")
  listed, prov = nl.load_or_mine(never, ID_NAMES, label_list=str(tmp_path / "list.txt"), corpus=corpus)
  assert listed.labels == ["cloud", "dark"] and prov == {"label_list": str(tmp_path / "list.txt")}
  assert nl.load_or_mine(never, ID_NAMES) is None

"""Stage 1 context prompts: exact official strings, both answers-file formats, both policies, errors."""
import json

import pytest

from synood_jax.synthesis import context_prompts as cp
from synood_jax.synthesis.sources import SourceRecord


def official(answer):  # generate_near_ood_sample.py
  return "A photo only remain " + answer[:73] + "."


LONG = ("the wooden dock extends into a calm lake under an overcast sky, with pine trees lining the far shore "
        "and a small rowboat tied to a post")


def test_build_prompt_exact():
  assert len(LONG) > 73
  for answer in ["", "grass", "a b" * 10, LONG, LONG[:73], LONG[:72], LONG[:74], " leading space\n", "{braces}"]:
    assert cp.build_prompt(answer) == official(answer)
  assert cp.build_prompt(LONG) == "A photo only remain " + LONG[:73] + "."
  assert cp.build_prompt(LONG) == ("A photo only remain the wooden dock extends into a calm lake under an "
                                    "overcast sky, with pine.")  # the first 73 characters, then "."
  assert cp.build_prompt("x" * 70 + "abcdef") == "A photo only remain " + "x" * 70 + "abc."  # cut mid-word
  assert cp.build_prompt("abcdef", template="ctx: {context}!", max_chars=3) == "ctx: abc!"
  assert cp.build_prompt("abcdef", max_chars=None) == official("abcdef")


RECORDS = [SourceRecord("n01", 0, "n01/n01_1.JPEG", 3.0), SourceRecord("n01", 0, "n01/n01_2.JPEG", 2.0),
           SourceRecord("n02", 1, "n02/n02_7.JPEG", 2.5), SourceRecord("n02", 1, "n02/n02_9.JPEG", 1.0)]


def _llava_lines():
  return [
      {"question_id": 0, "image": "/data/imagenet/train/n01/n01_1.JPEG", "prompt": "Describe the background",
       "text": LONG, "answer_id": "x", "model_id": "llava", "metadata": {}},
      {"image_path": "./n01\\n01_2.JPEG", "text": "a sandy beach"},  # relative, Windows separator
      {"question_id": "n02_7", "text": "a dim kitchen counter"},  # bare id: matched by stem
  ]


def test_llava_jsonl_and_skip_policy(tmp_path):
  p = tmp_path / "answers.jsonl"
  p.write_text("\n".join(json.dumps(d) for d in _llava_lines()) + "\n\n")
  contexts = cp.read_contexts(str(p))
  assert contexts == {"/data/imagenet/train/n01/n01_1.JPEG": LONG, "n01/n01_2.JPEG": "a sandy beach",
                      "n02_7": "a dim kitchen counter"}
  prompts, missing = cp.prompts_for_sources(RECORDS, contexts, policy="skip")
  assert missing == 1
  assert prompts == {"n01/n01_1.JPEG": official(LONG), "n01/n01_2.JPEG": official("a sandy beach"),
                     "n02/n02_7.JPEG": official("a dim kitchen counter")}
  assert list(prompts) == ["n01/n01_1.JPEG", "n01/n01_2.JPEG", "n02/n02_7.JPEG"]  # record order
  # the file path works as `contexts` too
  assert cp.prompts_for_sources(RECORDS, str(p)) == (prompts, 1)


def test_mapping_formats_and_fallback_policy(tmp_path):
  mapping = {"n01/n01_1.JPEG": "snow", "other/n02_9.JPEG": "a parking lot", "n01/n01_2.JPEG": "water"}
  single = tmp_path / "ctx.json"
  single.write_text(json.dumps(mapping, indent=2))  # one object over several lines
  per_line = tmp_path / "ctx.jsonl"
  per_line.write_text("\n".join(json.dumps({k: v}) for k, v in mapping.items()))
  several = tmp_path / "ctx2.jsonl"
  items = list(mapping.items())
  several.write_text(json.dumps(dict(items[:2])) + "\n" + json.dumps(dict(items[2:])) + "\n")
  for f in (single, per_line, several):
    assert cp.read_contexts(str(f)) == mapping
  prompts, missing = cp.prompts_for_sources(RECORDS, cp.read_contexts(str(single)), policy="fallback",
                                            fallback_prompt="A photo.")
  assert missing == 1
  assert prompts == {"n01/n01_1.JPEG": "A photo only remain snow.", "n01/n01_2.JPEG": "A photo only remain water.",
                     "n02/n02_7.JPEG": "A photo.",  # no context
                     "n02/n02_9.JPEG": "A photo only remain a parking lot."}  # basename match
  assert list(prompts) == [r.path for r in RECORDS]
  prompts, missing = cp.prompts_for_sources(RECORDS, mapping, policy="fallback")
  assert prompts["n02/n02_7.JPEG"] == cp.DEFAULT_FALLBACK_PROMPT and missing == 1


def test_json_list_of_records(tmp_path):
  p = tmp_path / "answers.json"
  p.write_text(json.dumps(_llava_lines()))
  assert len(cp.read_contexts(str(p))) == 3


def test_matching_tiers_and_ambiguity():
  idx = cp.ContextIndex({"/a/train/n01/x.JPEG": "full", "val/n01/x.JPEG": "other", "n01/x.JPEG": "exact",
                         "y.JPEG": "base", "z": "stem"})
  assert idx.lookup("n01/x.JPEG") == "exact"
  assert cp.ContextIndex({"/a/train/n01/x.JPEG": "full", "/b/n02/x.JPEG": "no"}).lookup("n01/x.JPEG") == "full"
  assert idx.lookup("n05/y.JPEG") == "base"
  assert idx.lookup("n05/z.JPEG") == "stem"
  assert idx.lookup("n05/w.JPEG") is None
  with pytest.raises(ValueError, match="n07/q.JPEG.*ambiguous"):
    cp.ContextIndex({"a/q.JPEG": "one", "b/q.JPEG": "two"}).lookup("n07/q.JPEG")
  # the same text under two paths is not ambiguous
  assert cp.ContextIndex({"a/q.JPEG": "one", "b/q.JPEG": "one"}).lookup("n07/q.JPEG") == "one"


def test_missing_is_logged(monkeypatch):
  seen = []
  monkeypatch.setattr(cp.logging, "warning", lambda msg, *a: seen.append(msg % a))
  _, missing = cp.prompts_for_sources(["n01/a.JPEG", "n01/b.JPEG"], {"n01/a.JPEG": "x"}, policy="skip")
  assert missing == 1
  assert len(seen) == 1 and "1 of 2" in seen[0] and "n01/b.JPEG" in seen[0]


@pytest.mark.parametrize("bad, line, what", [
    ('{"image": "a.JPEG", "text": "ok"}\n{"image": "b.JPEG", "text": "ok"\n', 2, "not valid JSON"),
    ('{"image": "a.JPEG", "text": "ok"}\n\n{"answer_id": 3, "text": "no path"}\n', 3, "no image path"),
    ('{"image": "a.JPEG", "text": "ok"}\n{"image": "b.JPEG", "text": 5}\n', 2, "'text' is int"),
    ('{"a.JPEG": "ok"}\n{"b.JPEG": ["x"]}\n', 2, "'b.JPEG'"),
    ('{"a.JPEG": "ok"}\n[1, 2]\n', 2, "expected a JSON object"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, line, what):
  p = tmp_path / "answers.jsonl"
  p.write_text(bad)
  with pytest.raises(cp.ContextFileError, match=rf"answers\.jsonl:{line}: .*{what}"):
    cp.read_contexts(str(p))


def test_bad_policy():
  with pytest.raises(ValueError, match="policy"):
    cp.prompts_for_sources(RECORDS, {}, policy="drop")

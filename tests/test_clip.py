"""Flax CLIP against transformers' PyTorch CLIP: features, dtypes, layouts, round trip, bad input."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file, save_file

from synood_jax.models import checkpoint_io, zero_shot
from synood_jax.models.checkpoint_io import CheckpointError
from synood_jax.models import clip, clip_modules, clip_preprocess
from synood_jax.demo import tiny_clip as tiny

transformers = pytest.importorskip("transformers")

VOCAB = len(tiny.char_vocab())
EOS = tiny.char_vocab()[tiny.EOS]
BATCH = 4
TINY_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8)
# 4 ids above the tokenizer's: with ids > EOS present, argmax(ids) and "first EOS" pool differently
TINY_TEXT = dict(vocab_size=VOCAB + 4, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=77, bos_token_id=EOS - 1,
                 eos_token_id=EOS, pad_token_id=EOS)
CONFIGS = {
    # new-style eos id: pooled at the first end-of-text token
    "quick_gelu": dict(vision_config=dict(TINY_VISION, hidden_act="quick_gelu"),
                       text_config=dict(TINY_TEXT, hidden_act="quick_gelu"), projection_dim=16),
    # legacy eos_token_id == 2: transformers pools at argmax(ids)
    "gelu_legacy_eos": dict(vision_config=dict(TINY_VISION, hidden_act="gelu", layer_norm_eps=1e-6),
                            text_config=dict(TINY_TEXT, hidden_act="gelu", eos_token_id=2, bos_token_id=0,
                                             pad_token_id=1), projection_dim=24),
    # ViT-B/16 widths, one layer per tower
    "b16_widths": dict(vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=1,
                                          num_attention_heads=12, image_size=224, patch_size=16),
                       text_config=dict(TINY_TEXT, hidden_size=512, intermediate_size=2048, num_hidden_layers=1,
                                        num_attention_heads=8), projection_dim=512),
}


def torch_features(model, images_nhwc, ids):
  """Projected features as transformers 5 computes them (get_*_features returns an output object)."""
  with torch.no_grad():
    img = model.visual_projection(model.vision_model(torch.tensor(images_nhwc).permute(0, 3, 1, 2)).pooler_output)
    txt = model.text_projection(model.text_model(torch.tensor(ids, dtype=torch.long)).pooler_output)
  return img.numpy(), txt.numpy()


def random_inputs(config, seed=0):
  rng = np.random.default_rng(seed)
  size = config["vision_config"]["image_size"]
  images = rng.normal(size=(BATCH, size, size, 3)).astype(np.float32)
  ids = rng.integers(0, VOCAB + 4, size=(BATCH, 77)).astype(np.int32)
  ids[ids == EOS] = 7
  ids[np.arange(BATCH), [5, 20, 76, 40]] = EOS  # end-of-text at varied positions, then again later
  ids[np.arange(BATCH), [6, 30, 0, 41]] = EOS
  ids[:, 3] = 2  # legacy eos id: "first 2" would differ from transformers' argmax rule
  return images, ids


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request, tmp_path_factory):
  """(name, folder, torch model, inputs, torch features) for each config."""
  torch.manual_seed(0)
  config = transformers.CLIPConfig(**CONFIGS[request.param])
  model = transformers.CLIPModel(config).eval()
  folder = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(folder)
  tiny.write_char_tokenizer(folder)
  images, ids = random_inputs(CONFIGS[request.param])
  return request.param, folder, model, (images, ids), torch_features(model, images, ids)


def test_eos_position_rules():
  ids = np.array([[5, EOS, 1, EOS + 2, EOS], [EOS + 1, 2, 2, EOS, 0]])
  assert clip_modules.eos_position(ids, EOS).tolist() == [1, 3]  # first end-of-text
  assert clip_modules.eos_position(ids, 2).tolist() == [3, 0]  # legacy: argmax of the ids


def test_features_match_transformers(reference):
  name, folder, _, (images, ids), (t_img, t_txt) = reference
  bundle = clip.from_pretrained(folder)
  pooled = clip_modules.eos_position(ids, bundle.config.text.eos_token_id)
  assert (np.asarray(pooled) != np.argmax(ids, -1)).any() or name == "gelu_legacy_eos"
  img, txt = np.asarray(bundle.image_features(images)), np.asarray(bundle.text_features(ids))
  print(f"{name}: image max|diff| {np.abs(img - t_img).max():.2e}, text {np.abs(txt - t_txt).max():.2e}")
  np.testing.assert_allclose(img, t_img, atol=1e-5, rtol=0)
  np.testing.assert_allclose(txt, t_txt, atol=1e-5, rtol=0)


def test_bfloat16_close_to_float32(reference):
  name, folder, _, (images, ids), (t_img, t_txt) = reference
  if name == "gelu_legacy_eos":
    pytest.skip("two bf16 configs are enough")
  bundle = clip.from_pretrained(folder, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax_leaves(bundle.params))
  for ours, ref in ((bundle.image_features(images), t_img), (bundle.text_features(ids), t_txt)):
    assert ours.dtype == jnp.bfloat16
    cos = cosine(np.asarray(ours, np.float32), ref)
    print(f"{name} bf16 cosine min {cos.min():.5f}")
    assert cos.min() >= 0.99


def test_round_trip_through_transformers(reference, tmp_path):
  name, folder, _, (images, ids), (t_img, t_txt) = reference
  if name == "b16_widths":
    pytest.skip("layout is the same as the tiny configs")
  bundle = clip.from_pretrained(folder)
  out = clip.save_pretrained(bundle, str(tmp_path / "saved"))
  assert os.path.isfile(os.path.join(out, "vocab.json"))  # tokenizer files travel along
  model = transformers.CLIPModel.from_pretrained(out).eval()
  img, txt = torch_features(model, images, ids)
  np.testing.assert_allclose(img, t_img, atol=1e-6, rtol=0)
  np.testing.assert_allclose(txt, t_txt, atol=1e-6, rtol=0)
  assert model.logit_scale.item() == pytest.approx(float(bundle.params["logit_scale"]))
  assert model.config.text_config.eos_token_id == bundle.config.text.eos_token_id


def test_tokenize_and_zero_shot(reference):
  name, folder, model, _, _ = reference
  if name != "quick_gelu":
    pytest.skip("one config")
  bundle = clip.from_pretrained(folder)
  ids = bundle.tokenize(["a photo of the cat", "x" * 200])
  assert ids.shape == (2, 77) and ids.dtype == np.int32
  ref_tok = transformers.CLIPTokenizer.from_pretrained(folder)
  assert ids[0].tolist() == ref_tok("a photo of the cat", padding="max_length", max_length=77)["input_ids"]
  assert ids[1, -1] == EOS  # truncation keeps the end-of-text token
  classes, templates = ["cat", "dog", "red fox"], ["a photo of a {}.", "a {} in the wild."]
  ours = zero_shot.class_text_features(bundle, bundle.params, classes, templates, batch_size=BATCH)
  prompts = [t.format(c) for c in classes for t in templates]
  with torch.no_grad():
    ref_ids = torch.tensor(ref_tok(prompts, padding="max_length", max_length=77)["input_ids"])
    feats = model.text_projection(model.text_model(ref_ids).pooler_output).numpy()
  feats = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
  feats = feats.reshape(3, 2, -1).mean(1)
  feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
  np.testing.assert_allclose(ours, feats, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1, atol=1e-6)


def test_tower_only_folders(tmp_path):
  torch.manual_seed(1)
  vcfg = transformers.CLIPVisionConfig(**TINY_VISION, projection_dim=16)
  tcfg = transformers.CLIPTextConfig(**TINY_TEXT, projection_dim=16)
  vision = transformers.CLIPVisionModelWithProjection(vcfg).eval()
  text = transformers.CLIPTextModelWithProjection(tcfg).eval()
  vision.save_pretrained(tmp_path / "v")
  text.save_pretrained(tmp_path / "t")
  images, ids = random_inputs(CONFIGS["quick_gelu"], seed=1)
  with torch.no_grad():
    t_img = vision(pixel_values=torch.tensor(images).permute(0, 3, 1, 2)).image_embeds.numpy()
    t_txt = text(input_ids=torch.tensor(ids, dtype=torch.long)).text_embeds.numpy()
  vb, tb = clip.from_pretrained(str(tmp_path / "v")), clip.from_pretrained(str(tmp_path / "t"))
  assert vb.config.text is None and tb.config.vision is None and "logit_scale" not in vb.params
  np.testing.assert_allclose(np.asarray(vb.image_features(images)), t_img, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(tb.text_features(ids)), t_txt, atol=1e-5, rtol=0)
  # and back: our tower-only folder loads as the same transformers class
  clip.save_pretrained(vb, str(tmp_path / "v2"))
  again = transformers.CLIPVisionModelWithProjection.from_pretrained(str(tmp_path / "v2")).eval()
  with torch.no_grad():
    np.testing.assert_allclose(again(pixel_values=torch.tensor(images).permute(0, 3, 1, 2)).image_embeds.numpy(),
                               t_img, atol=1e-6, rtol=0)


def test_bare_text_tower_as_in_stable_diffusion(tmp_path):
  """CLIPTextModel (no projection): transformers 5 layout, 4.x layout (`text_model.` prefix, position_ids
  buffer, as SD checkpoints), pytorch_model.bin; hidden states, pooled output, separate tokenizer folder."""
  torch.manual_seed(2)
  cfg = transformers.CLIPTextConfig(**dict(TINY_TEXT, eos_token_id=2, bos_token_id=0, pad_token_id=1))
  model = transformers.CLIPTextModel(cfg).eval()
  model.save_pretrained(tmp_path / "v5")
  old = tmp_path / "v4"
  old.mkdir()
  (old / "config.json").write_text((tmp_path / "v5" / "config.json").read_text())
  state = {"text_model." + k: v for k, v in load_file(str(tmp_path / "v5" / "model.safetensors")).items()}
  state["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, old / "pytorch_model.bin")
  tok = tiny.write_char_tokenizer(str(tmp_path / "tokenizer"))
  _, ids = random_inputs(CONFIGS["quick_gelu"], seed=2)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long))
  for folder in (tmp_path / "v5", old):
    bundle = clip.from_pretrained(str(folder), tokenizer_path=tok)
    assert not bundle.config.projection and bundle.folder == tok
    assert set(bundle.params) == {"text_model"}
    hidden = np.asarray(bundle.text_hidden_states(bundle.params, ids))
    np.testing.assert_allclose(hidden, out.last_hidden_state.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(bundle.text_features(ids)), out.pooler_output.numpy(), atol=1e-5, rtol=0)
  assert bundle.tokenize(["a cat"]).shape == (1, 77)
  with pytest.raises(ValueError, match="no vision tower"):
    bundle.encode_image(bundle.params, np.zeros((1, 32, 32, 3), np.float32))
  with pytest.raises(CheckpointError, match="no tokenizer files"):
    clip.from_pretrained(str(old), tokenizer_path=str(tmp_path / "v5"))
  clip.save_pretrained(bundle, str(tmp_path / "ours"))
  again = transformers.CLIPTextModel.from_pretrained(str(tmp_path / "ours")).eval()
  with torch.no_grad():
    np.testing.assert_allclose(again(input_ids=torch.tensor(ids, dtype=torch.long)).last_hidden_state.numpy(),
                               out.last_hidden_state.numpy(), atol=1e-6, rtol=0)


def test_make_tiny_clip_loads_in_transformers(tmp_path):
  folder = tiny.make_tiny_clip(str(tmp_path / "tiny"), seed=3, vision_hidden_act="gelu")
  ours = clip.from_pretrained(folder)
  model = transformers.CLIPModel.from_pretrained(folder).eval()
  tok = transformers.CLIPTokenizer.from_pretrained(folder)
  assert len(tok) == VOCAB and tok.pad_token_id == EOS
  assert tok("the")["input_ids"] == [EOS - 1, tiny.char_vocab()["the</w>"], EOS]  # merges applied
  images = np.random.default_rng(0).normal(size=(BATCH, 32, 32, 3)).astype(np.float32)
  ids = ours.tokenize(["a", "bb", "the ccc", "dddd dd"])
  t_img, t_txt = torch_features(model, images, ids)
  np.testing.assert_allclose(np.asarray(ours.image_features(images)), t_img, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(ours.text_features(ids)), t_txt, atol=1e-5, rtol=0)
  # zero-shot image features: normalized, batch padded (4 images, batch 3)
  feats = zero_shot.image_features(ours, ours.params, images, batch_size=3)
  np.testing.assert_allclose(feats, t_img / np.linalg.norm(t_img, axis=-1, keepdims=True), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input.

@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("good"))
  return tiny.make_tiny_clip(folder, seed=0, vision_num_hidden_layers=1, text_num_hidden_layers=1)


def _edit(src, dst, edit):
  os.makedirs(dst, exist_ok=True)
  for name in os.listdir(src):
    if name != "model.safetensors":
      with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
        g.write(f.read())
  state = load_file(os.path.join(src, "model.safetensors"))
  edit(state)
  save_file(state, os.path.join(dst, "model.safetensors"))
  return dst


def test_no_config(tmp_path):
  with pytest.raises(CheckpointError, match="config.json"):
    clip.from_pretrained(str(tmp_path))


def test_missing_key(good_folder, tmp_path):
  folder = _edit(good_folder, str(tmp_path / "m"), lambda s: s.pop("text_model.final_layer_norm.weight"))
  with pytest.raises(CheckpointError, match=r"model.safetensors.*missing.*text_model/final_layer_norm/scale"):
    clip.from_pretrained(folder)


def test_extra_key(good_folder, tmp_path):
  folder = _edit(good_folder, str(tmp_path / "e"),
                 lambda s: s.__setitem__("vision_model.extra_head.weight", np.zeros((2, 2), np.float32)))
  with pytest.raises(CheckpointError, match=r"model.safetensors.*unexpected.*vision_model.extra_head.weight"):
    clip.from_pretrained(folder)


def test_shape_mismatch(good_folder, tmp_path):
  key = "vision_model.encoder.layers.0.mlp.fc1.weight"
  folder = _edit(good_folder, str(tmp_path / "s"), lambda s: s.__setitem__(key, np.zeros((65, 32), np.float32)))
  with pytest.raises(CheckpointError, match=r"model.safetensors.*fc1.weight.*\(65, 32\).*\(32, 64\)"):
    clip.from_pretrained(folder)


def test_position_ids_buffer_is_ignored(good_folder, tmp_path):
  folder = _edit(good_folder, str(tmp_path / "p"), lambda s: s.__setitem__(
      "text_model.embeddings.position_ids", np.arange(77, dtype=np.int64)[None]))
  clip.from_pretrained(folder)


def test_two_token_tokenizer_raises(good_folder, tmp_path):
  # transformers silently builds a 2-token vocabulary when vocab.json / merges.txt did not load
  broken = tmp_path / "broken_tok"
  broken.mkdir()
  (broken / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))
  with pytest.raises(CheckpointError, match="broken_tok.*2 tokens"):
    clip.load_tokenizer(str(broken))
  bundle = clip.from_pretrained(good_folder)
  no_tok = clip.CLIPBundle(bundle.config, bundle.module, bundle.params, folder=str(broken))
  with pytest.raises(CheckpointError, match="broken_tok"):
    no_tok.tokenize(["a cat"])


def test_unknown_activation(good_folder, tmp_path):
  cfg = checkpoint_io.read_config(good_folder)
  cfg["vision_config"]["hidden_act"] = "swish_of_doom"
  checkpoint_io.write_config(str(tmp_path), cfg)
  with pytest.raises(CheckpointError, match="swish_of_doom"):
    clip.from_pretrained(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Preprocessing.

def _images():
  rng = np.random.default_rng(0)
  shapes = [(300, 200), (180, 260), (100, 100), (224, 224), (97, 503)]
  out = [rng.integers(0, 256, size=s + (3,), dtype=np.uint8) for s in shapes]
  out.append(Image.fromarray(rng.integers(0, 256, size=(150, 170), dtype=np.uint8), mode="L"))
  out.append(Image.fromarray(rng.integers(0, 256, size=(260, 240, 4), dtype=np.uint8), mode="RGBA"))
  return out


def test_preprocess_equals_clip_image_processor():
  ref = transformers.CLIPImageProcessor()
  for im in _images():
    want = ref(images=im, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    got = clip_preprocess.preprocess(im)[0]
    assert got.dtype == np.float32 and got.shape == (224, 224, 3)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  batch = np.stack([im for im in _images() if isinstance(im, np.ndarray) and im.shape == (300, 200, 3)] * 2)
  np.testing.assert_array_equal(clip_preprocess.preprocess(batch), clip_preprocess.preprocess(batch.astype(float)))
  with pytest.raises(ValueError, match="uint8"):
    clip_preprocess.preprocess(batch / 255.0)  # [0, 1] floats: transformers' handling is ambiguous, refuse


def test_preprocess_reads_folder_config(good_folder):
  ref = transformers.CLIPImageProcessor.from_pretrained(good_folder)
  cfg = clip_preprocess.load_config(good_folder)
  assert (cfg.shortest_edge, cfg.crop_height) == (32, 32)
  assert clip_preprocess.load_config(None) == clip_preprocess.PreprocessConfig()
  ims = _images()[:5]
  want = ref(images=ims, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  np.testing.assert_allclose(clip_preprocess.preprocess(ims, cfg), want, atol=1e-6, rtol=0)


def cosine(a, b):
  return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def jax_leaves(tree):
  import jax
  return jax.tree_util.tree_leaves(tree)


def test_zero_shot_equals_clip_model_logits(good_folder):
  """zero_shot.zero_shot from PIL / uint8 images against transformers' CLIPModel logits_per_image (one
  template), the template ensemble, preprocessed input, a mesh and a bundle without logit_scale."""
  from synood_jax import parallel
  model = transformers.CLIPModel.from_pretrained(good_folder).eval()
  proc = transformers.CLIPImageProcessor.from_pretrained(good_folder)
  tok = transformers.CLIPTokenizer.from_pretrained(good_folder)
  bundle = clip.from_pretrained(good_folder)
  ims = _images()[:5] + _images()[-2:]  # arrays of several sizes, a grayscale and an RGBA PIL image
  classes, templates = ["cat", "dog", "red fox"], ["a photo of a {}.", "a {} in the wild."]
  pixels = torch.tensor(proc(images=ims, return_tensors="np")["pixel_values"])

  def ids(texts):
    return torch.tensor(tok(texts, padding="max_length", max_length=77)["input_ids"])

  got = zero_shot.zero_shot(bundle, ims, classes)
  with torch.no_grad():
    out = model(input_ids=ids([templates[0].format(c) for c in classes]), pixel_values=pixels)
  want = out.logits_per_image.numpy()
  assert got.logits.shape == (len(ims), 3)
  err = np.abs(got.logits - want).max() / np.abs(want).max()
  print(f"zero-shot logits vs transformers CLIPModel: {err:.2e} relative")
  assert err <= 1e-5
  np.testing.assert_allclose(got.probs, out.logits_per_image.softmax(-1).numpy(), atol=1e-6, rtol=0)

  with torch.no_grad():
    img = model.visual_projection(model.vision_model(pixels).pooler_output).numpy()
    txt = model.text_projection(model.text_model(ids([t.format(c) for c in classes for t in templates]))
                                .pooler_output).numpy()
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  t_c = unit(unit(txt).reshape(3, 2, -1).mean(1))
  ensemble = model.logit_scale.exp().item() * unit(img) @ t_c.T
  both = zero_shot.zero_shot(bundle, ims, classes, templates)
  np.testing.assert_allclose(both.logits, ensemble, atol=1e-5 * np.abs(ensemble).max(), rtol=0)
  pre = clip_preprocess.preprocess(ims, clip_preprocess.load_config(good_folder))
  np.testing.assert_allclose(zero_shot.zero_shot(bundle, pre, classes, templates, preprocessed=True).logits,
                             both.logits, atol=1e-6, rtol=0)
  on_mesh = zero_shot.zero_shot(bundle, ims, classes, templates, mesh=parallel.make_mesh())
  np.testing.assert_allclose(on_mesh.logits, both.logits, atol=1e-5, rtol=0)
  no_scale = {k: v for k, v in bundle.params.items() if k != "logit_scale"}
  with pytest.raises(ValueError, match="no logit_scale"):
    zero_shot.zero_shot(bundle, ims, classes, params=no_scale)

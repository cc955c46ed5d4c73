"""The T5 and CLIP text encoders against their reference implementations' outputs on tiny
random checkpoints (tests/fixtures/text_encoders, made by tools/make_text_encoder_fixtures.py),
and their tokenisation against the reference tokenizers'."""

import os
import shutil

import numpy as np
import pytest

from pfm.models import text_encoders as te

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "text_encoders")
TEXTS = [
  "a red panda climbs a tree in the snow",
  "the digit 7 moves down and to the left",
  "waves crash on a rocky shore at sunset, slow motion",
  "",
]


def _expected(name):
  return dict(np.load(os.path.join(FIXTURES, name, "expected.npz")))


@pytest.mark.parametrize("name,pad_id", [("t5", 0), ("clip_l", None), ("clip_g", None)])
def test_tokenisation_matches_the_reference_tokenizer(name, pad_id):
  folder = os.path.join(FIXTURES, name)
  tokenizer = te.load_tokenizer(folder)
  expected = _expected(name)
  if pad_id is None:  # CLIP pads with its end token
    pad_id = tokenizer.token_to_id("<|endoftext|>")
  ids, mask = te.tokenize(tokenizer, TEXTS, 16, pad_id=pad_id)
  np.testing.assert_array_equal(ids, expected["ids"])
  np.testing.assert_array_equal(mask, expected["mask"])


def test_t5_encoder_matches_reference():
  """float32, |ours - reference| <= 1e-5 at every unmasked token."""
  model = te.T5Encoder.from_pretrained(os.path.join(FIXTURES, "t5"))
  e = _expected("t5")
  out = np.asarray(model(e["ids"], e["mask"]))
  valid = e["mask"].astype(bool)
  np.testing.assert_allclose(out[valid], e["last_hidden_state"][valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["clip_l", "clip_g"])
def test_clip_text_encoder_matches_reference(name):
  """Final and penultimate states, pooled-and-projected output; float32 within 1e-5."""
  model = te.CLIPTextEncoder.from_pretrained(os.path.join(FIXTURES, name))
  e = _expected(name)
  out = model(e["ids"], e["mask"])
  valid = e["mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(out.last_hidden_state)[valid],
                             e["last_hidden_state"][valid], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out.hidden_states[-2])[valid], e["penultimate"][valid],
                             atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out.text_embeds, e["text_embeds"], atol=1e-5, rtol=1e-5)


def test_t5_relative_buckets():
  """Exact buckets near zero, one side per half, logarithmic and saturating further out."""
  import jax.numpy as jnp
  offsets = jnp.array([-30, -5, -1, 0, 1, 2, 5, 19, 30])
  buckets = np.asarray(te.t5_relative_position_bucket(offsets, 8, 20))
  # 4 buckets per direction (keys before the query: 0..3, after it: 4..7), exact below 2.
  assert buckets[3] == 0 and buckets[4] == 4 + 1 and buckets[2] == 1
  assert buckets[-1] == buckets[-2] == 7 and buckets[0] == 3  # saturated at max_distance
  assert list(buckets[4:]) == sorted(buckets[4:])


def test_checkpoint_layout_errors_name_the_tensor(tmp_path):
  from safetensors.numpy import load_file, save_file
  folder = tmp_path / "t5"
  shutil.copytree(os.path.join(FIXTURES, "t5"), folder)
  tensors = load_file(str(folder / "model.safetensors"))
  missing = dict(tensors)
  del missing["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
  save_file(missing, str(folder / "model.safetensors"))
  with pytest.raises(te.CheckpointLayoutError, match="encoder.block.1.layer.1.DenseReluDense.wo"):
    te.T5Encoder.from_pretrained(str(folder))
  extra = dict(tensors, **{"encoder.block.9.extra.weight": np.zeros(3, np.float32)})
  save_file(extra, str(folder / "model.safetensors"))
  with pytest.raises(te.CheckpointLayoutError, match="encoder.block.9.extra.weight"):
    te.T5Encoder.from_pretrained(str(folder))
  with pytest.raises(FileNotFoundError, match="config.json"):
    te.CLIPTextEncoder.from_pretrained(str(tmp_path))

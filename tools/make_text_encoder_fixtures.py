r"""Writes the golden fixtures of `pfm.models.text_encoders` (tests/fixtures/text_encoders/).

Run once, outside the package's environment, with PyTorch and transformers (never needed by pfm
or its tests):

  python -m venv /tmp/fixtures && /tmp/fixtures/bin/pip install torch==2.13.0 \
      "transformers==5.24.0" "tokenizers==0.23.3" safetensors numpy
  /tmp/fixtures/bin/python tools/make_text_encoder_fixtures.py --output=tests/fixtures/text_encoders

What it makes, all deterministic (torch.manual_seed(0) before each model):

* two tiny tokenizers trained here with `tokenizers` on the captions below (no download): a
  Unigram one saved through `T5TokenizerFast` (pad 0, </s> 1, <unk> 2, "</s>" appended) and a
  byte-level BPE one saved through `CLIPTokenizerFast` (<|startoftext|> ... <|endoftext|>);
* three tiny random checkpoints in the Hugging Face layout (config.json + model.safetensors):
  ``t5`` (`T5EncoderModel`, v1.1 layout: gated-GELU, untied, relative buckets 8 / distance 20),
  ``clip_l`` (`CLIPTextModelWithProjection`, quick GELU, as ViT-L/14's text tower) and ``clip_g``
  (GELU, as OpenCLIP ViT-bigG/14's);
* ``expected.npz`` per model: the reference tokenizer's ids and mask for ``TEXTS`` (padded to
  ``MAX_LENGTH``) and the reference model's float32 outputs on them (T5: last_hidden_state with
  the mask; CLIP: last_hidden_state, hidden_states[-2], pooler_output, text_embeds).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

TEXTS = [
  "a red panda climbs a tree in the snow",
  "the digit 7 moves down and to the left",
  "waves crash on a rocky shore at sunset, slow motion",
  "",
]
MAX_LENGTH = 16
CORPUS = TEXTS[:3] + [
  "a bicycle race through a forest", "a cat sleeps on a warm windowsill",
  "cars drive along a highway at night", "the digit 3 moves up and to the right",
  "a drone flies over green hills", "people walk through a busy market",
]


def t5_tokenizer(folder: str):
  tok = Tokenizer(models.Unigram())
  tok.normalizer = normalizers.NFKC()
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"],
                                    unk_token="<unk>")
  tok.train_from_iterator(CORPUS * 4, trainer)
  tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                     special_tokens=[("</s>", 1)])
  fast = transformers.T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                      unk_token="<unk>", extra_ids=0)
  fast.save_pretrained(folder)
  return fast


def clip_tokenizer(folder: str):
  tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
  tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS * 4, trainer)
  bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
  tok.post_processor = processors.TemplateProcessing(
    single="<|startoftext|> $A <|endoftext|>",
    special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
    pad_token="<|endoftext|>", unk_token="<|endoftext|>")
  fast.save_pretrained(folder)
  return fast


def encode(tokenizer) -> tuple[np.ndarray, np.ndarray]:
  batch = tokenizer(TEXTS, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                    return_tensors="np")
  return batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--output", default="tests/fixtures/text_encoders")
  out = parser.parse_args().output

  folder = os.path.join(out, "t5")
  tokenizer = t5_tokenizer(folder)
  ids, mask = encode(tokenizer)
  torch.manual_seed(0)
  config = transformers.T5Config(
    vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
    relative_attention_num_buckets=8, relative_attention_max_distance=20,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
  model = transformers.T5EncoderModel(config).eval()
  with torch.no_grad():
    hidden = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                   attention_mask=torch.as_tensor(mask)).last_hidden_state
  model.save_pretrained(folder, safe_serialization=True)
  np.savez(os.path.join(folder, "expected.npz"), ids=ids, mask=mask,
           last_hidden_state=hidden.numpy().astype(np.float32))

  for name, act in (("clip_l", "quick_gelu"), ("clip_g", "gelu")):
    folder = os.path.join(out, name)
    tokenizer = clip_tokenizer(folder)
    ids, mask = encode(tokenizer)
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=MAX_LENGTH, hidden_act=act,
      projection_dim=24, bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = transformers.CLIPTextModelWithProjection(config).eval()
    with torch.no_grad():
      result = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                     attention_mask=torch.as_tensor(mask), output_hidden_states=True)
    model.save_pretrained(folder, safe_serialization=True)
    np.savez(os.path.join(folder, "expected.npz"), ids=ids, mask=mask,
             last_hidden_state=result.last_hidden_state.numpy(),
             penultimate=result.hidden_states[-2].numpy(),
             text_embeds=result.text_embeds.numpy())
  print("wrote", out)


if __name__ == "__main__":
  main()

"""Byte-level caption tokens.

A caption becomes ``[BOS] + (UTF-8 bytes + 2)``: id 0 is padding, id 1 is BOS and ids 2..257 are
the 256 byte values, so the vocabulary has ``VOCAB_SIZE = 258`` entries and needs no tokenizer
file. The same function serves training (captions from the manifest) and sampling (prompts).
"""

from __future__ import annotations

import numpy as np

PAD_ID = 0
BOS_ID = 1
BYTE_OFFSET = 2
VOCAB_SIZE = 256 + BYTE_OFFSET


def caption_fits(text: str, max_len: int) -> bool:
  """Whether ``encode_caption(text, max_len)`` keeps the whole caption.

  Args:
    text: the caption.
    max_len: the token budget, BOS included.

  Returns:
    True if the UTF-8 encoding of ``text`` has at most ``max_len - 1`` bytes.
  """
  return len(text.encode("utf-8")) <= max_len - 1


def encode_caption(text: str, max_len: int) -> np.ndarray:
  """Encodes a caption as byte tokens.

  A caption longer than the budget is cut after its last whole character that fits, so the
  tokens never end in a partial multi-byte UTF-8 sequence (``caption_fits`` tells whether a
  caption is cut).

  Args:
    text: the caption (any Unicode string; may be empty).
    max_len: the largest number of tokens to return, BOS included (>= 1).

  Returns:
    int32 ``[n]`` with ``1 <= n <= max_len``: ``BOS_ID`` followed by the UTF-8 bytes of ``text``
    shifted by 2 (values in [2, 257]); a cut caption keeps the longest prefix of whole characters
    that fits ``max_len - 1`` bytes, so ``n`` may be up to 3 less than ``max_len``.

  Raises:
    ValueError: if ``max_len < 1``.
  """
  if max_len < 1:
    raise ValueError(f"encode_caption: max_len must be >= 1, got {max_len}")
  encoded = text.encode("utf-8")
  end = len(encoded)
  if end > max_len - 1:
    end = max_len - 1
    while end > 0 and encoded[end] & 0xC0 == 0x80:  # A continuation byte: back to its lead.
      end -= 1
  data = np.frombuffer(encoded, dtype=np.uint8)[:end]
  tokens = np.empty(data.size + 1, dtype=np.int32)
  tokens[0] = BOS_ID
  tokens[1:] = data.astype(np.int32) + BYTE_OFFSET
  return tokens


def decode_caption(tokens: np.ndarray) -> str:
  """Inverse of ``encode_caption``: drops BOS and padding, decodes bytes (invalid -> U+FFFD)."""
  tokens = np.asarray(tokens)
  data = tokens[tokens >= BYTE_OFFSET] - BYTE_OFFSET
  return bytes(data.astype(np.uint8).tolist()).decode("utf-8", errors="replace")

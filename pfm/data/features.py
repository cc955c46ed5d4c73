"""The feature cache: VAE posteriors and caption embeddings in array_record shards.

``python -m pfm.extract`` (``pfm/extract.py``) writes, into one folder:

  settings.json              what the features were made with (`extraction_settings`); a rerun
                             with other settings is refused rather than mixed in
  shard-00000.array_record   the clips of manifest records 0 .. R-1, one msgpack record each
  shard-00000.json           its metadata: the clips (source, caption, latent frames) and skips
  ...
  index.json                 every finished shard and its clip count: what `FeatureSource` reads
  partial/shard-0000j/       a shard being written: one file per finished manifest record, so a
                             killed extraction resumes inside the shard

One clip record (``flax.serialization`` msgpack of a dict of NumPy arrays):

  mean      float32 [T', h, w, C]   posterior mean of the latents, normalised as the DiT sees them
                                    (``CausalVideoVAE.normalize``: the first latent frame, which
                                    encodes pixel frame 0 alone, with the image constants)
  std       float32 [T', h, w, C]   posterior standard deviation, on the same normalised scale
  text      str                     the caption
  source    str                     the media file and the first source frame of the clip
  text_embeddings  float32 [Lc, E]  (frozen text encoders only) the caption's token features,
                                    padding cut off (T5 v1.1 for the Pyramid Flow layout)
  pooled    float32 [Ep]            (with CLIP) the pooled, projected caption embedding(s)

Training draws a fresh latent ``mean + std * n`` each time it reads a clip (``pfm.data.pipeline``),
as the official pipeline samples the posterior of its cached moments.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from etils import epath
from flax import serialization

from pfm import errors

INDEX_FILE = "index.json"
SETTINGS_FILE = "settings.json"
FORMAT_VERSION = 1


class FeatureCacheError(errors.UserError, ValueError):
  """A feature folder that cannot be used: missing, unfinished, or made with other settings."""


def shard_name(index: int) -> str:
  """``shard-00012`` (files ``shard-00012.array_record`` and ``shard-00012.json``)."""
  return f"shard-{index:05d}"


def encode_clip(clip: dict[str, Any]) -> bytes:
  """One clip record (the module docstring's fields) as msgpack bytes."""
  return serialization.msgpack_serialize(
      {k: np.asarray(v, np.float32) if isinstance(v, np.ndarray) else v for k, v in clip.items()})


def decode_clip(data: bytes) -> dict[str, Any]:
  """The inverse of `encode_clip`."""
  return serialization.msgpack_restore(data)


def read_json(path: epath.Path) -> Any:
  return json.loads(path.read_text())


def write_json_atomic(path: epath.Path, value: Any) -> None:
  """Writes ``value`` as JSON through a temporary file and a rename, so a reader never sees half
  a file."""
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_text(json.dumps(value, indent=1))
  tmp.rename(path)


def check_settings(folder: str, settings: dict[str, Any]) -> None:
  """Records ``settings`` in ``folder/settings.json``, or checks them against the recorded ones.

  Raises:
    FeatureCacheError: naming each setting that differs from the folder's.
  """
  path = epath.Path(folder) / SETTINGS_FILE
  settings = json.loads(json.dumps(settings))  # tuples as lists, as read back
  if path.exists():
    recorded = read_json(path)
    diff = [f"{k}: {recorded.get(k)!r} in the folder, {settings.get(k)!r} now"
            for k in sorted(set(recorded) | set(settings)) if recorded.get(k) != settings.get(k)]
    if diff:
      raise FeatureCacheError(
          f"{folder} holds features made with other settings ({'; '.join(diff)}): pass a new "
          "--output, or remove the folder")
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  write_json_atomic(path, settings)


def write_index(folder: str, num_shards: int) -> dict[str, Any]:
  """Gathers the finished shards' metadata into ``folder/index.json`` and returns it.

  Raises:
    FeatureCacheError: if a shard of the ``num_shards`` is not finished (its ``.json`` missing).
  """
  root = epath.Path(folder)
  shards, skipped = [], {}
  for j in range(num_shards):
    meta_path = root / f"{shard_name(j)}.json"
    if not meta_path.exists():
      raise FeatureCacheError(f"{folder}: shard {j} of {num_shards} is not finished; rerun "
                              "pfm.extract with the same --output to complete it")
    meta = read_json(meta_path)
    shards.append(meta)
    for reason, n in meta["skipped"].items():
      skipped[reason] = skipped.get(reason, 0) + n
  index = dict(format=FORMAT_VERSION, settings=read_json(root / SETTINGS_FILE),
               num_clips=sum(len(s["clips"]) for s in shards), skipped=skipped,
               shards=[dict(file=s["file"], num_clips=len(s["clips"])) for s in shards])
  write_json_atomic(root / INDEX_FILE, index)
  return index


def load_index(folder: str) -> dict[str, Any]:
  """``folder/index.json`` (see the module docstring).

  Raises:
    FeatureCacheError: if the folder has no index (not extracted, or not finished) or no clips.
  """
  path = epath.Path(folder) / INDEX_FILE
  if not path.exists():
    partial = (epath.Path(folder) / SETTINGS_FILE).exists()
    raise FeatureCacheError(
        f"config.data.features={folder}: no {INDEX_FILE} "
        + ("(the extraction has not finished; rerun pfm.extract with this --output)" if partial
           else "(make it with `python -m pfm.extract --config=... --output=DIR`)"))
  index = read_json(path)
  if not index["num_clips"]:
    raise FeatureCacheError(f"config.data.features={folder}: the index holds no clips "
                            f"(skipped: {index['skipped']})")
  return index


class FeatureSource:
  """The clips of a feature folder as a grain random-access source (``len``, ``[i]``).

  ``source[i]`` is the decoded clip record ``i`` (the module docstring's fields), in shard
  order. The shards are opened on first use, so the source pickles into grain's workers.

  Raises:
    FeatureCacheError: see `load_index`.
  """

  def __init__(self, folder: str):
    self.folder = folder
    self.index = load_index(folder)
    self.settings = self.index["settings"]
    self._paths = [os.path.join(folder, s["file"]) for s in self.index["shards"]
                   if s["num_clips"]]
    self._records = None

  def __len__(self) -> int:
    return int(self.index["num_clips"])

  def __getitem__(self, i: int) -> dict[str, Any]:
    if self._records is None:
      import grain
      self._records = grain.sources.ArrayRecordDataSource(self._paths)
    return decode_clip(self._records[int(i)])

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_records"] = None
    return state

  def __repr__(self) -> str:
    return f"FeatureSource({self.folder!r}, {len(self)} clips)"

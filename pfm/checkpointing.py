"""Checkpoints: orbax (async) for the train state, with the grain data iterator inside.

A checkpoint at step N holds the model parameters, optimizer state, EMA parameters, the step, the
base RNG and the state of every data shard's iterator, so a killed run that is restarted with the
same workdir continues with exactly the same parameters and the same data order. Arrays are
written collectively by all processes (each its own shards, orbax) and restore into any mesh:
``restore`` reads each array straight into the sharding of its abstract target.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from etils import epath
import grain
import orbax.checkpoint as ocp


class DataShardsHandler(ocp.CheckpointHandler):
  """Orbax handler for ``pfm.data.pipeline.ProcessBatches``: one JSON file per data shard.

  Every process writes the grain iterator state of each of its shards to
  ``shard_{s}-of-{S}.json`` and reads back the files of the shards it owns now. The files do not
  depend on the number of processes, so a run written by 2 processes restores onto 1 (or 4) with
  the same data order, as long as ``config.data.num_shards`` is the same.
  """

  def save(self, directory: epath.Path, args: DataShardsSave):
    batches = args.item
    for shard, state in batches.shard_states().items():
      (directory / f"shard_{shard}-of-{batches.shard_count}.json").write_text(json.dumps(state))

  def restore(self, directory: epath.Path, args: DataShardsRestore):
    batches = args.item
    states = {}
    for shard in batches.shards:
      path = directory / f"shard_{shard}-of-{batches.shard_count}.json"
      if not path.exists():
        saved = sorted(p.name for p in directory.iterdir())
        raise ValueError(
            f"{path} does not exist: the checkpoint holds {saved}; the data shards of a run "
            "(config.data.num_shards) must not change on resume")
      states[shard] = json.loads(path.read_text())
    batches.set_shard_states(states)
    return batches

  def metadata(self, directory: epath.Path):
    del directory

  def finalize(self, directory: epath.Path):
    del directory

  def close(self):
    pass

  @classmethod
  def typestr(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@ocp.args.register_with_handler(DataShardsHandler, for_save=True)
@dataclasses.dataclass
class DataShardsSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataShardsHandler, for_restore=True)
@dataclasses.dataclass
class DataShardsRestore(ocp.args.CheckpointArgs):
  item: Any


def _data_args(data_iterator, save: bool):
  """Args for the ``data`` item: per-shard files for ``ProcessBatches``, else grain's own."""
  if hasattr(data_iterator, "shard_states"):
    return (DataShardsSave if save else DataShardsRestore)(data_iterator)
  return (grain.checkpoint.CheckpointSave if save else grain.checkpoint.CheckpointRestore)(
      data_iterator)


class Checkpointer:
  """A thin wrapper over ``orbax.checkpoint.CheckpointManager`` with items ``state`` and ``data``."""

  def __init__(self, directory: str, *, max_to_keep: int = 2, save_every_steps: int = 1,
               async_save: bool = True):
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_every_steps,
            enable_async_checkpointing=async_save, create=True),
        item_names=("state", "data"))

  @property
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
    """Saves ``state`` (a pytree of arrays) and the iterator's state; async for the arrays."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = _data_args(data_iterator, save=True)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, data_iterator=None, step: int | None = None, *,
              partial: bool = False):
    """Restores the state into the structure/shardings of ``abstract_state``.

    Args:
      abstract_state: the target pytree (``jax.ShapeDtypeStruct`` leaves are enough).
      data_iterator: a grain iterator to restore in place, or None.
      step: the checkpoint step; default the latest.
      partial: restore only the top-level entries present in ``abstract_state`` (e.g. just
        ``{"ema_params": ...}`` for sampling), reading nothing else from disk.

    Returns:
      ``(state, step)``.

    Raises:
      FileNotFoundError: if there is no checkpoint.
    """
    step = self.latest_step if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint to restore in {self._manager.directory}")
    if partial:
      restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
      items = {"state": ocp.args.PyTreeRestore(
          item=abstract_state, restore_args=restore_args, partial_restore=True)}
    else:
      items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = _data_args(data_iterator, save=False)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], step

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()

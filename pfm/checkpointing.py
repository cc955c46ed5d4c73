"""Checkpoints: orbax (async) for the train state, with the grain data iterator inside.

A checkpoint at step N holds the model parameters, optimizer state, EMA parameters, the step, the
base RNG and the state of this host's data iterator, so a killed run that is restarted with the
same workdir continues with exactly the same parameters and the same data order.
"""

from __future__ import annotations

import os

import grain
import orbax.checkpoint as ocp


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
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
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
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], step

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()

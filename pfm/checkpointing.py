"""Checkpoints: orbax (async) for the train state, with the grain data iterator inside.

A checkpoint at step N holds the model parameters, optimizer state, EMA parameters, the step, the
base RNG and the state of every data shard's iterator, so a killed run that is restarted with the
same workdir continues with exactly the same parameters and the same data order. Arrays are
written collectively by all processes (each its own shards, orbax) and restore into any mesh:
``restore`` reads each array straight into the sharding of its abstract target.

Checkpoints never lie:

* every save also writes ``meta``: two 32-bit content checksums of every array (`inspect_state`),
  and each data shard's file carries the SHA-256 of its iterator state; ``restore`` recomputes
  them on what it read and checks that every value is finite, so a flipped byte, a truncated file
  or a deleted manifest is reported as a `CheckpointDamagedError` naming the step;
* without an explicit step, ``restore`` falls back to the newest intact checkpoint, with a warning
  naming each damaged one (`Checkpointer.set_aside` moves them out of the way for a resumed run);
* a save that fails in the background (a full disk) is raised by the next `Checkpointer.check`
  (the train loop calls it every step) as a `CheckpointSaveError` with a one-line cause, and old
  checkpoints are rotated away only after a newer one has committed, so the newest good
  checkpoint always survives.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from pfm import errors


class CheckpointError(errors.UserError, RuntimeError):
  """A checkpoint cannot be read or written; the message names the step and the cause."""


class CheckpointDamagedError(CheckpointError):
  """A checkpoint's files are missing, unreadable, or differ from their checksums at save.

  Attributes:
    step: the damaged checkpoint's step.
    cause: one line saying what is wrong.
  """

  def __init__(self, step: int, cause: str, directory: str = ""):
    self.step, self.cause = step, cause
    super().__init__(f"checkpoint {step} in {directory or 'the run'} is damaged: {cause}")


class CheckpointSaveError(CheckpointError):
  """A checkpoint could not be written (e.g. the disk is full)."""


class NoCheckpointError(CheckpointError, FileNotFoundError):
  """There is no (intact) checkpoint to restore."""


def one_line_cause(error: BaseException) -> str:
  """``"Type: first line of message"`` of the most telling exception in ``error``'s chain.

  An ``OSError`` with an errno (a full disk, a missing file) anywhere in the chain wins; else the
  innermost exception. Messages are cut to 300 characters.
  """
  chain, seen = [], set()
  e = error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    chain.append(e)
    e = e.__cause__ or e.__context__
  text = " ".join(str(x) for x in chain)
  if "No space left on device" in text or any(
      getattr(x, "errno", None) == 28 for x in chain):
    return "No space left on device (the filesystem is full)"
  best = next((x for x in chain if isinstance(x, OSError) and x.errno), chain[-1])
  lines = str(best).strip().splitlines()
  message = lines[0] if lines else ""
  return f"{type(best).__name__}: {message[:300]}"


@dataclasses.dataclass(frozen=True)
class StateReport:
  """What `inspect_state` found in a pytree of arrays.

  Attributes:
    checksums: ``{leaf path: (sum, weighted sum)}``, both of the leaf's bits mod 2^32.
    nonfinite: ``{leaf path: number of NaN/inf values}`` for floating leaves that have any.
  """

  checksums: dict[str, tuple[int, int]]
  nonfinite: dict[str, int]

  @property
  def num_nonfinite(self) -> int:
    return sum(self.nonfinite.values())

  def nonfinite_summary(self, limit: int = 3) -> str:
    """``"309648 non-finite values (params: 1200, opt_state: ...)"``, grouped by top-level key."""
    groups: dict[str, int] = {}
    for name, n in self.nonfinite.items():
      top = name.split("]")[0].strip("['\"")
      groups[top] = groups.get(top, 0) + n
    parts = ", ".join(f"{k}: {v}" for k, v in sorted(groups.items(), key=lambda kv: -kv[1])[:limit])
    return f"{self.num_nonfinite} non-finite values ({parts})"


def _bits(x: np.ndarray) -> np.ndarray:
  """The raw bits of ``x`` as uint32 (8-byte values become two words on a new last axis)."""
  x = np.ascontiguousarray(x)
  if x.dtype == np.bool_:
    return x.astype(np.uint32)
  width = x.dtype.itemsize
  if width == 8:
    return x.view(np.uint32).reshape(x.shape + (2,))
  return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[width]).astype(np.uint32, copy=False)


def _block_stats(block: np.ndarray, offsets, global_shape) -> np.ndarray:
  """uint64 ``[sum of bits, sum of bits * (2 i + 1), non-finite count]`` of one block of an array.

  ``i`` is the element's flat index in the whole array (``offsets``: the block's start in it),
  so the sums over the blocks of a sharded array add up to the whole array's, mod 2^32.
  """
  bits = _bits(block).astype(np.uint64)
  if bits.ndim > block.ndim:  # 8-byte values: two words each
    offsets, global_shape = tuple(offsets) + (0,), tuple(global_shape) + (2,)
  index = np.zeros(bits.shape, np.uint64)  # row-major flat index in the whole array
  for axis, (start, size) in enumerate(zip(offsets, global_shape)):
    coord = np.arange(start, start + bits.shape[axis], dtype=np.uint64)
    index = index * np.uint64(size) + coord.reshape([-1 if a == axis else 1
                                                     for a in range(bits.ndim)])
  mask = np.uint64(2**32 - 1)
  weighted = np.sum((bits * ((np.uint64(2) * index + np.uint64(1)) & mask)) & mask,
                    dtype=np.uint64)
  nonfinite = (int(np.sum(~np.isfinite(block))) if np.issubdtype(block.dtype, np.inexact)
               else 0)
  return np.array([np.sum(bits, dtype=np.uint64), weighted, nonfinite], np.uint64)


def _leaf_stats(x) -> np.ndarray:
  """`_block_stats` of a whole leaf: summed over this process's shards (one replica each).

  Integer sums mod 2^32 are exact and independent of how the array is sharded. Changing one
  word changes the weighted sum (odd weights are invertible mod 2^32); a random corruption goes
  unnoticed with probability about 2^-64.
  """
  if isinstance(x, jax.Array):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    total = np.zeros(3, np.uint64)
    for shard in x.addressable_shards:
      if shard.replica_id == 0:
        offsets = [sl.start or 0 for sl in shard.index] if shard.index else []
        total += _block_stats(np.asarray(shard.data), offsets, x.shape)
    return total
  x = np.asarray(x)
  return _block_stats(x, [0] * x.ndim, x.shape)


def inspect_state(tree) -> StateReport:
  """Content checksums and non-finite counts of every array leaf of ``tree``.

  Computed on the host from each process's own shards and summed over the processes, so a
  multi-process run gets the same result on every process, whatever the mesh.

  Args:
    tree: a pytree of arrays (e.g. the train state, or its ``{"ema_params": ...}`` part); leaf
      names are ``jax.tree_util.keystr`` paths, so a part's names match the whole's.

  Returns:
    a `StateReport`.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  names = [jax.tree_util.keystr(path) for path, _ in flat]
  stats = np.stack([_leaf_stats(x) for _, x in flat]) if flat else np.zeros((0, 3), np.uint64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    stats = np.sum(multihost_utils.process_allgather(stats), axis=0, dtype=np.uint64)
  stats[:, :2] %= np.uint64(2**32)
  checksums = {n: (int(a), int(b)) for n, (a, b, _) in zip(names, stats)}
  nonfinite = {n: int(c) for n, (_, _, c) in zip(names, stats) if int(c)}
  return StateReport(checksums, nonfinite)


def _verified_iterator_state(path: epath.Path):
  """A data shard's iterator state, checked against the SHA-256 written beside it."""
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"{path.name}: unreadable ({one_line_cause(e)})") from e
  if not (isinstance(saved, dict) and "iterator_state" in saved):
    return saved  # written before checksums
  state = saved["iterator_state"]
  digest = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
  if digest != saved.get("sha256"):
    raise ValueError(f"{path.name}: the data iterator state differs from its checksum")
  return state


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
      text = json.dumps(state, sort_keys=True)
      (directory / f"shard_{shard}-of-{batches.shard_count}.json").write_text(json.dumps(
          {"iterator_state": state, "sha256": hashlib.sha256(text.encode()).hexdigest()}))

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
      states[shard] = _verified_iterator_state(path)
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


class _Manager(ocp.CheckpointManager):
  """``CheckpointManager`` that remembers a failed background save.

  Orbax's finalisation thread consumes the error of a failed asynchronous commit (it logs it and
  moves on); this keeps it in ``save_error`` for `Checkpointer.check`.
  """

  save_error: BaseException | None = None

  def check_for_errors(self):
    try:
      super().check_for_errors()
    except Exception as e:  # noqa: BLE001 - kept and re-raised
      self.save_error = e
      raise


class Checkpointer:
  """Orbax ``CheckpointManager`` with items ``state``, ``data`` and ``meta`` (checksums).

  Args:
    directory: the checkpoint folder (``workdir/checkpoints``; local or ``gs://``).
    max_to_keep: checkpoints kept; older ones are deleted only once a newer one has committed
      (while a save is in flight one more may exist). None keeps all.
    save_every_steps: orbax's save interval (``save`` skips other steps unless forced).
    async_save: write arrays in the background.
  """

  def __init__(self, directory: str, *, max_to_keep: int | None = 2, save_every_steps: int = 1,
               async_save: bool = True):
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self._max_to_keep = max_to_keep
    self._in_flight: int | None = None
    self.damaged: list[CheckpointDamagedError] = []  # skipped by the last `restore`
    self.restored_extra: dict = {}  # the ``extra`` saved with the last restored checkpoint
    self._manager = _Manager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None, save_interval_steps=save_every_steps,
            enable_async_checkpointing=async_save, create=True),
        item_names=("state", "data", "meta"))

  @property
  def latest_step(self) -> int | None:
    """The newest committed checkpoint's step (intact or not), or None."""
    return self._manager.latest_step()

  @property
  def steps(self) -> list[int]:
    """Committed checkpoint steps, oldest first."""
    return sorted(self._manager.all_steps())

  # -- saving ------------------------------------------------------------------------------------

  def save(self, step: int, state, data_iterator=None, *, report: StateReport | None = None,
           force: bool = False, extra: dict | None = None) -> bool:
    """Saves ``state`` (a pytree of arrays), the iterator's state and their checksums.

    Waits for the previous save first (raising its failure), rotates old checkpoints, then
    starts this one; the arrays are written in the background.

    Args:
      step: the checkpoint's step.
      state: the train state.
      data_iterator: ``ProcessBatches`` or a grain iterator, or None.
      report: `inspect_state(state)` if the caller already has it.
      force: save even off orbax's save interval.
      extra: JSON-serialisable values kept in the ``meta`` item (e.g. the training compute so
        far); `restored_extra` returns them after a restore.

    Returns:
      whether a save was started.

    Raises:
      CheckpointSaveError: if this or the previous save could not be written (one-line cause).
    """
    self.wait()
    self._rotate(keep=None if self._max_to_keep is None else max(self._max_to_keep - 1, 1))
    report = report or inspect_state(state)
    items = {"state": ocp.args.StandardSave(state),
             "meta": ocp.args.JsonSave({"step": int(step), "checksums": report.checksums,
                                        "extra": dict(extra or {})})}
    if data_iterator is not None:
      items["data"] = _data_args(data_iterator, save=True)
    try:
      started = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # noqa: BLE001 - any write failure: report it in one line
      self._discard_partial(step)
      raise CheckpointSaveError(f"checkpoint {step} could not be written to {self.directory}: "
                                f"{one_line_cause(e)}") from e
    if started:
      self._in_flight = step
    return started

  def check(self) -> None:
    """Raises `CheckpointSaveError` if a background save has failed (cheap; call every step)."""
    if self._in_flight is not None and not self._manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Waits for the save in flight; raises `CheckpointSaveError` if it did not commit."""
    error = None
    try:
      self._manager.wait_until_finished()  # re-raises a failure of the finished save
      self._manager.check_for_errors()
    except Exception as e:  # noqa: BLE001 - reported below, in one line
      error = e
    if self._in_flight is None:
      return
    error = error or self._manager.save_error
    self._manager.save_error = None
    step, self._in_flight = self._in_flight, None
    self._manager.reload()
    if error is None and step in self._manager.all_steps():
      return
    self._discard_partial(step)
    cause = one_line_cause(error) if error is not None else "it did not commit"
    latest = self.latest_step
    kept = ("no checkpoint was committed" if latest is None
            else f"the newest committed checkpoint is {latest}")
    raise CheckpointSaveError(
        f"checkpoint {step} could not be written to {self.directory}: {cause}; {kept}") from error

  def _rotate(self, keep: int | None) -> None:
    """Deletes all but the newest ``keep`` committed checkpoints (process 0 deletes)."""
    if keep is None:
      return
    for step in self.steps[:-keep]:
      self._manager.delete(step)

  def _discard_partial(self, step: int | None) -> None:
    """Removes the uncommitted temporary folder of a failed save (it may fill a disk)."""
    if step is None or jax.process_index() != 0:
      return
    for path in epath.Path(self.directory).glob(f"{step}.orbax-checkpoint-tmp*"):
      try:
        path.rmtree()
      except OSError as e:
        logging.warning("Could not remove %s: %s", path, e)

  # -- restoring ---------------------------------------------------------------------------------

  def restore(self, abstract_state, data_iterator=None, step: int | None = None, *,
              partial: bool = False):
    """Restores and verifies a checkpoint into the structure/shardings of ``abstract_state``.

    Without ``step``, the newest intact checkpoint: each newer damaged one is skipped with a
    warning naming it (`damaged` lists them afterwards; `set_aside` moves them away).

    Args:
      abstract_state: the target pytree (``jax.ShapeDtypeStruct`` leaves are enough).
      data_iterator: a grain iterator (or ``ProcessBatches``) to restore in place, or None.
      step: the checkpoint step; default the newest intact one.
      partial: restore only the top-level entries present in ``abstract_state`` (e.g. just
        ``{"ema_params": ...}`` for sampling), reading nothing else from disk.

    Returns:
      ``(state, step)``.

    Raises:
      NoCheckpointError: if there is no checkpoint, or none is intact (the message lists why).
      CheckpointDamagedError: if the given ``step`` is damaged.
      CheckpointError: if the given ``step`` does not exist.
    """
    self.damaged = []
    self.restored_extra = {}
    steps = self.steps
    if step is not None:
      if step not in steps:
        raise CheckpointError(f"no checkpoint {step} in {self.directory}; it has {steps}")
      return self._restore_verified(abstract_state, data_iterator, step, partial), step
    if not steps:
      raise NoCheckpointError(f"no checkpoint to restore in {self.directory}")
    for candidate in reversed(steps):
      try:
        state = self._restore_verified(abstract_state, data_iterator, candidate, partial)
      except CheckpointDamagedError as e:
        logging.warning("%s; trying an older one", e)
        self.damaged.append(e)
        continue
      if self.damaged:
        logging.warning("Restored checkpoint %d, the newest intact one (damaged: %s)", candidate,
                        ", ".join(str(e.step) for e in self.damaged))
      return state, candidate
    raise NoCheckpointError(
        f"no intact checkpoint in {self.directory}: "
        + "; ".join(f"{e.step}: {e.cause}" for e in self.damaged)
        + ". If every one fails the same way, the config may not match the run that wrote them")

  def _restore_verified(self, abstract_state, data_iterator, step: int, partial: bool):
    """One step's restore, its checksums and its finiteness checked."""
    if partial:
      restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
      items = {"state": ocp.args.PyTreeRestore(
          item=abstract_state, restore_args=restore_args, partial_restore=True)}
    else:
      items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = _data_args(data_iterator, save=False)
    has_meta = (epath.Path(self.directory) / str(step) / "meta").exists()
    if has_meta:
      items["meta"] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 - any read failure: the step is damaged
      raise CheckpointDamagedError(step, one_line_cause(e), self.directory) from e
    state = restored["state"]
    report = inspect_state(state)
    if has_meta:
      saved = restored["meta"]["checksums"]
      differ = [name for name, sums in report.checksums.items()
                if name in saved and tuple(saved[name]) != sums]
      if differ:
        raise CheckpointDamagedError(
            step, f"{len(differ)} of {len(report.checksums)} arrays differ from their checksums "
            f"at save (first: {differ[0]})", self.directory)
      extra = restored["meta"].get("extra", {})
    else:
      logging.warning("Checkpoint %d has no checksums (written by an older pfm): only its "
                      "finiteness is checked", step)
      extra = {}
    if report.num_nonfinite:
      raise CheckpointDamagedError(step, report.nonfinite_summary(), self.directory)
    self.restored_extra = dict(extra)
    return state

  def set_aside(self, step: int, why: str) -> str:
    """Moves checkpoint ``step`` to ``../checkpoints_set_aside/{step}-{why}`` (kept, not lost).

    Used for damaged checkpoints and for those after a step a run is resumed from, so the
    resumed run can save its own checkpoints under their step numbers. Process 0 moves; every
    process waits for it.

    Returns:
      the new location.
    """
    source = epath.Path(self.directory) / str(step)
    folder = epath.Path(self.directory).parent / "checkpoints_set_aside"
    target, n = folder / f"{step}-{why}", 1
    while target.exists():
      n += 1
      target = folder / f"{step}-{why}-{n}"
    if jax.process_index() == 0:
      folder.mkdir(parents=True, exist_ok=True)
      source.rename(target)
      logging.warning("Moved checkpoint %d to %s (%s)", step, target, why)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"pfm_set_aside_{step}")
    self._manager.reload()
    return os.fspath(target)

  def close(self, *, check: bool = True) -> None:
    """Waits for the save in flight, rotates to ``max_to_keep`` and closes.

    Args:
      check: raise `CheckpointSaveError` if the last save failed (False on an error path, so the
        first error is the one reported).
    """
    try:
      self.wait()
      self._rotate(self._max_to_keep)
    except CheckpointSaveError:
      if check:
        raise
    finally:
      self._manager.close()

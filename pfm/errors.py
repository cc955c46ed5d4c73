"""Errors a user can act on from their message alone, and how the commands report them.

A ``UserError`` says what is wrong and what to do (a config field, a damaged checkpoint, a full
disk, a bad sampler argument). The commands (``python -m pfm.train``, ``pfm.sample``,
``pfm.evaluate``, ``pfm.benchmark``) print its message as one ``prog: error: ...`` line and exit
with status 1; any other exception is a crash and keeps its full traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from absl import logging


class UserError(Exception):
  """An error whose message names its cause (a field, a file, a step); no traceback needed."""


class ConfigError(UserError, ValueError):
  """An invalid run config; the message names the ``config.`` field."""


class DataError(UserError, ValueError):
  """A manifest or media file that cannot give any training data; the message names it."""


class NotAWorkdirError(UserError, FileNotFoundError):
  """A folder that is not a ``pfm.train`` workdir (no ``config.json``)."""


class MissingInputError(UserError, FileNotFoundError):
  """An input file (a manifest, the default videos) that does not exist."""


def exit_on_user_error(main: Callable, prog: str) -> Callable:
  """Wraps an ``absl.app`` main: a `UserError` becomes one stderr line and exit status 1.

  Args:
    main: the ``main(argv)`` function.
    prog: the command's name for the message, e.g. ``"pfm.train"``.

  Returns:
    the wrapped ``main``; other exceptions propagate unchanged (with their traceback).
  """

  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except UserError as e:
      sys.stdout.flush()
      print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
      sys.exit(1)

  return wrapped



class _QuietLibraries:
  """An absl log filter for orbax's lines: no INFO, and warnings and errors in one line.

  A failed save or restore is raised by pfm as one error line that names the cause (and keeps
  the whole chain for a debugger); orbax's own reports of it, logged from several threads with
  their tracebacks, are cut to their first line.
  """

  def filter(self, record) -> bool:
    if "orbax" not in record.pathname and record.name != "asyncio":
      return True
    if record.levelno <= logging.converter.STANDARD_INFO:
      return False
    message = record.getMessage()
    record.msg = message.splitlines()[0][:300] if message else ""
    record.args, record.exc_info, record.exc_text = (), None, None
    return True


def quiet_library_tracebacks() -> None:
  """For a command's main: orbax logs in one line, and no "Event loop is closed" tracebacks.

  The latter are printed (through ``sys.unraisablehook``) by writes or reads still pending in
  orbax's event loop after a failed save or restore, one traceback each.
  """
  logging.get_absl_handler().addFilter(_QuietLibraries())
  hook = sys.unraisablehook

  def quiet(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and "Event loop is closed" in str(unraisable.exc_value)):
      hook(unraisable)

  sys.unraisablehook = quiet

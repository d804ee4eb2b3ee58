"""The one exception type that reaches users as a one-line message (exit code 2), the check of
output paths (:func:`writable_output`) that turns OS errors into it, and the one line of another
exception that such a message quotes (:func:`first_line`, :func:`message_line`, :func:`last_line`),
and :func:`quiet_logger`, which keeps a library's own messages from the user's screen."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path


class UserError(Exception):
    """Bad input from the user: a file, a model name, a flag, an op we cannot import.

    The CLI prints ``tvmshuffle: error: <message>`` and exits with code 2, without a
    traceback (``--verbose`` shows it). The message must name the file, op or flag.
    """


def writable_output(path: str | os.PathLike, flag: str, directory: bool = False) -> Path:
    """``path`` ready to be written: its directory (``directory``: ``path`` itself) created.

    A path that cannot be written (below a regular file, a directory where a file is asked
    for, no permission) is a :class:`UserError` naming ``flag`` (``-o``, ``--json``, …):
    commands call this before their slow part, not after it.
    """
    path = Path(path)
    folder = path if directory else path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is not a directory" if blocker else f"cannot create {folder} ({err.strerror or err})"
        raise UserError(f"{flag} {path}: {reason}") from err
    if not directory and path.is_dir():
        raise UserError(f"{flag} {path}: is a directory")
    if not os.access(folder, os.W_OK):
        raise UserError(f"{flag} {path}: {folder} is not writable")
    return path


def _lines(err: BaseException) -> list[str]:
    return [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message; the exception's type if it says nothing."""
    lines = _lines(err)
    return lines[0] if lines else type(err).__name__


def message_line(err: BaseException) -> str:
    """The line of ``err``'s message that says what went wrong: the first for Python's errors,
    the last for TVM's (a C++ traceback or ``Check failed`` comes before it)."""
    lines = _lines(err)
    if any(ln.startswith("Traceback") or "Check failed" in ln for ln in lines):
        return lines[-1]
    return lines[0] if lines else type(err).__name__


def last_line(err: BaseException) -> str:
    """The last line of ``err``'s message (where TVM's runtime and RPC errors say what went
    wrong); the exception's type if it says nothing."""
    lines = _lines(err)
    return lines[-1] if lines else type(err).__name__


@contextlib.contextmanager
def quiet_logger(logger: str | logging.Logger, level: int = logging.WARNING):
    """Within the block, ``logger`` (a name or a logger) says only what is ``level`` or worse."""
    lg = logging.getLogger(logger) if isinstance(logger, str) else logger
    previous = lg.level
    lg.setLevel(level)
    try:
        yield
    finally:
        lg.setLevel(previous)

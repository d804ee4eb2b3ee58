"""The one exception type that reaches users as a one-line message (exit code 2), and the
check of output paths (:func:`writable_output`) that turns OS errors into it."""

from __future__ import annotations

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

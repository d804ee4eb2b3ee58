"""The data tvmshuffle ships: the hand schedules and the tuning records.

They stay top-level directories of the repository (``schedules/``, ``tuning_logs/``);
``pyproject.toml`` maps them to the sub-packages ``tvmshuffle._shipped.schedules`` and
``tvmshuffle._shipped.tuning_logs`` (``[tool.setuptools.package-dir]``), so that an editable
install reads the repository's own directories and ``pip install .`` copies them into the
installed package. :func:`path` finds either through :mod:`importlib.resources`;
:func:`display` names a path for a report.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

from ..errors import UserError


def path(name: str) -> Path:
    """The directory of the shipped ``name``: ``"schedules"`` or ``"tuning_logs"``."""
    try:
        found = importlib.resources.files(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        raise UserError(f"the shipped {name}/ is not installed with tvmshuffle "
                        "(an install older than pyproject.toml's package-dir: reinstall, "
                        "e.g. pip install -e . in the repository)") from err
    return Path(found)


def display(where: str | os.PathLike) -> str:
    """How reports name a path: relative to the current directory when it is inside it, else
    ``tuning_logs/…`` or ``schedules/…`` for shipped data (wherever tvmshuffle is installed),
    else as given — never an absolute path of the machine a report was made on, if avoidable."""
    resolved = Path(where).resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        pass
    for name in ("tuning_logs", "schedules"):
        try:
            root = path(name).resolve()
        except UserError:
            continue
        if resolved.is_relative_to(root):
            return str(Path(name) / resolved.relative_to(root))
    return str(where)

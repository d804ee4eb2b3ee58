"""The data tvmshuffle ships: the hand schedules and the tuning records.

They stay top-level directories of the repository (``schedules/``, ``tuning_logs/``);
``pyproject.toml`` maps them to the sub-packages ``tvmshuffle._shipped.schedules`` and
``tvmshuffle._shipped.tuning_logs`` (``[tool.setuptools.package-dir]``), so that an editable
install reads the repository's own directories and ``pip install .`` copies them into the
installed package. :func:`path` finds either through :mod:`importlib.resources`.
"""

from __future__ import annotations

import importlib.resources
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

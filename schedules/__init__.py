"""The shipped hand schedules, installed as the package ``tvmshuffle._shipped.schedules``.

This file only makes the directory a package (``pyproject.toml``); :func:`tvmshuffle.schedules.load`
reads the schedule files themselves and skips files whose name starts with ``_``.
"""

"""The shipped tuning records, installed as the package ``tvmshuffle._shipped.tuning_logs``.

This file only makes the directory a package (``pyproject.toml``), so that editable installs
find it too; the records are the ``<target>/<model>/*.json`` files below it.
"""

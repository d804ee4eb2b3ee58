"""``pip install .`` (not editable): the shipped schedules and tuning records go with the package."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SMALL = "shufflenet_v1_g3_x0_25"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_non_editable_install_ships_schedules_and_records(tmp_path):
    # pip builds in the source tree (build/, *.egg-info): build a copy, not the working tree
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    for name in ("tvmshuffle", "schedules", "tuning_logs"):
        shutil.copytree(REPO / name, src / name, ignore=skip)
    logs = src / "tuning_logs" / "host-rocketlake" / "shufflenet_v1_g3_x1_0" / "logs"
    logs.mkdir(exist_ok=True)
    (logs / "tune.json").write_text("{}")  # tuning_logs/**/logs/ is not part of the product

    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", "--target", str(site), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    installed = site / "tvmshuffle"
    for py in (REPO / "tvmshuffle").rglob("*.py"):  # pyproject.toml lists the sub-packages by hand
        assert (installed / py.relative_to(REPO / "tvmshuffle")).is_file(), py
    assert not list(installed.rglob("logs"))

    work = tmp_path / "work"  # cwd: the repository's sources must not be importable
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TVMSHUFFLE_SCHEDULES", "TVMSHUFFLE_TUNING_LOGS")}
    env["PYTHONPATH"] = str(site)

    def run(*args):
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=work, env=env,
                              timeout=500)

    probe = run("-c", "import tvmshuffle, tvmshuffle.records as r; print(tvmshuffle.__file__); print(r.default_root())")
    assert probe.returncode == 0, probe.stderr
    package, root = (Path(line) for line in probe.stdout.splitlines())
    assert package.parent == installed
    assert root.is_relative_to(installed), root
    assert (root / "host-rocketlake" / "shufflenet_v1_g3_x1_0" / "target.json").is_file()

    proc = run("-m", "tvmshuffle", "compile", SMALL, "--input-shape", "1,3,64,64", "--schedules", "hand",
               "-o", "m.so")
    assert proc.returncode == 0, proc.stderr
    hand = re.search(r"(\d+) with hand schedules", proc.stdout)
    assert hand and int(hand.group(1)) > 0, proc.stdout
    assert (work / "m.so").is_file()

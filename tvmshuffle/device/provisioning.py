"""Provision an emulated aarch64 device: an arm64 Python 3.11 with TVM, run under qemu-user.

Everything comes from the package registries (Debian's mirrors and PyPI) and lands in a cache
directory outside the repository (:func:`default_cache_dir`)::

    CACHE/                          $TVMSHUFFLE_CACHE or ~/.cache/tvmshuffle/emu-aarch64
      debs/*.deb                    arm64 Debian packages (apt-get download)
      wheels/*.whl                  manylinux aarch64 wheels (pip download)
      root/                         the debs unpacked (dpkg -x): usr/bin/python3.11, libc, ...
      site-packages/                the wheels unpacked: tvm, tvm_ffi, numpy, ...
      bin/python3.11-aarch64        wrapper: qemu-aarch64-static -L root ... python3.11 "$@"
      logs/  run/                   written by :mod:`tvmshuffle.device.service`
      provisioned.json              stamp: what was installed; a second run reuses everything

The steps, in order (each skips what is already there, so an interrupted run resumes):

1. host tools: ``qemu-aarch64-static`` and the cross linker (apt-get install when missing);
2. ``dpkg --add-architecture arm64`` and ``apt-get update`` (when arm64 is not known yet);
3. ``apt-get download`` the arm64 packages, ``dpkg -x`` each into ``root/``;
4. ``pip download`` the aarch64 wheels, unzip each into ``site-packages/``;
5. write the wrapper script;
6. check: the wrapper imports tvm and prints the expected version (~15 s under emulation).

binfmt_misc is not available on these machines, so an aarch64 executable cannot be exec'd
directly: every emulated process goes through the wrapper (see ``shared/ARM-EMULATION.md``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

log = logging.getLogger(__name__)

TVM_VERSION = "0.27.0.post1"
TVM_FFI_VERSION = "0.1.14.post1"

#: arm64 Debian packages of a minimal Python 3.11 and the libraries TVM's wheel links to.
DEBS = (
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6",
    "libstdc++6", "libgcc-s1", "zlib1g", "libexpat1", "libffi8", "libssl3", "libbz2-1.0",
    "liblzma5", "libsqlite3-0", "libncursesw6", "libtinfo6", "libreadline8", "libuuid1",
    "libcrypt1", "media-types",
)
#: Packages of architecture "all" (downloaded without the ``:arm64`` qualifier).
ARCH_ALL_DEBS = frozenset({"media-types"})

#: Python packages the device's RPC server needs. Unpinned ones get the host venv's version
#: when the host has them (so both ends run the same numpy), else the newest.
WHEELS = (
    f"apache-tvm=={TVM_VERSION}", f"apache-tvm-ffi=={TVM_FFI_VERSION}", "numpy", "ml_dtypes",
    "scipy", "psutil", "cloudpickle", "tornado", "typing_extensions",
)
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux2014_aarch64")

#: Debian packages that provide the host tools, by command.
HOST_TOOLS = {"qemu-aarch64-static": "qemu-user-static", "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu"}

#: Bumped when the layout of the cache changes, so old stamps are not trusted.
LAYOUT_VERSION = 1


def default_cache_dir() -> Path:
    """``$TVMSHUFFLE_CACHE`` or ``~/.cache/tvmshuffle/emu-aarch64``."""
    env = os.environ.get("TVMSHUFFLE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "tvmshuffle" / "emu-aarch64"


@dataclass(frozen=True)
class EmulatorLayout:
    """Where the pieces of the emulated device live, and what goes into it."""

    cache_dir: Path = field(default_factory=default_cache_dir)
    python_version: str = "3.11"
    debs: tuple[str, ...] = DEBS
    wheels: tuple[str, ...] = WHEELS

    @property
    def root(self) -> Path:
        return self.cache_dir / "root"

    @property
    def site_packages(self) -> Path:
        return self.cache_dir / "site-packages"

    @property
    def python(self) -> Path:
        return self.root / "usr" / "bin" / f"python{self.python_version}"

    @property
    def wrapper(self) -> Path:
        """The emulated interpreter, as a script any host process can exec."""
        return self.cache_dir / "bin" / f"python{self.python_version}-aarch64"

    @property
    def deb_dir(self) -> Path:
        return self.cache_dir / "debs"

    @property
    def wheel_dir(self) -> Path:
        return self.cache_dir / "wheels"

    @property
    def log_dir(self) -> Path:
        return self.cache_dir / "logs"

    @property
    def run_dir(self) -> Path:
        return self.cache_dir / "run"

    @property
    def stamp(self) -> Path:
        return self.cache_dir / "provisioned.json"


@dataclass
class ProvisionResult:
    layout: EmulatorLayout
    tvm_version: str
    seconds: float
    reused: bool  # True: the stamp matched, nothing was downloaded or checked


# --------------------------------------------------------------------------- entry point


def provision(layout: EmulatorLayout | None = None, force: bool = False) -> ProvisionResult:
    """Make the emulated device's interpreter ready (idempotent). Errors are :class:`UserError`."""
    layout = layout or EmulatorLayout()
    start = time.perf_counter()
    layout.cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(layout.cache_dir / ".lock"):
        ensure_host_tools()
        wanted = _stamp_content(layout)
        if not force and _read_stamp(layout) == wanted and layout.wrapper.exists():
            log.info("emulated aarch64 device already provisioned in %s", layout.cache_dir)
            return ProvisionResult(layout, TVM_VERSION, time.perf_counter() - start, reused=True)
        steps = [
            ("arm64 package lists", ensure_arm64_apt),
            ("arm64 Debian packages", fetch_debs),
            ("aarch64 Python wheels", fetch_wheels),
            ("wrapper script", write_wrapper),
        ]
        for i, (what, step) in enumerate(steps, 1):
            log.info("[%d/%d] %s", i, len(steps) + 1, what)
            step(layout)
        log.info("[%d/%d] checking: import tvm under emulation (~15 s)", len(steps) + 1, len(steps) + 1)
        version = check_interpreter(layout)
        layout.stamp.write_text(json.dumps(wanted, indent=2) + "\n")
    seconds = time.perf_counter() - start
    log.info("emulated aarch64 device provisioned in %s (%.0f s)", layout.cache_dir, seconds)
    return ProvisionResult(layout, version, seconds, reused=False)


def is_provisioned(layout: EmulatorLayout | None = None) -> bool:
    """True when the stamp matches this version of the package list (no side effects)."""
    layout = layout or EmulatorLayout()
    return _read_stamp(layout) == _stamp_content(layout) and layout.wrapper.exists()


# --------------------------------------------------------------------------- steps


def ensure_host_tools() -> None:
    """apt-get install qemu-user-static / the cross linker when their commands are missing."""
    missing = [pkg for cmd, pkg in HOST_TOOLS.items() if shutil.which(cmd) is None]
    if not missing:
        return
    log.info("installing host tools: %s", " ".join(missing))
    _apt(["update", "-qq"], "apt-get update")
    _apt(["install", "-y", "-qq", "--no-install-recommends", *missing], f"apt-get install {' '.join(missing)}")
    still = [cmd for cmd in HOST_TOOLS if shutil.which(cmd) is None]
    if still:
        raise UserError(f"device provisioning: {', '.join(still)} still missing after apt-get install")


def ensure_arm64_apt(layout: EmulatorLayout) -> None:
    """Make apt know arm64 packages: add the architecture, then update the lists."""
    arches = _run(["dpkg", "--print-foreign-architectures"], "dpkg --print-foreign-architectures").split()
    if "arm64" not in arches:
        _run(_sudo(["dpkg", "--add-architecture", "arm64"]), "dpkg --add-architecture arm64")
    elif _apt_has(f"{layout.debs[0]}:arm64"):
        return
    _apt(["update", "-qq"], "apt-get update")


def fetch_debs(layout: EmulatorLayout) -> None:
    """apt-get download the arm64 packages still missing from ``debs/``; dpkg -x all into ``root/``."""
    layout.deb_dir.mkdir(parents=True, exist_ok=True)
    missing = [name for name in layout.debs if not _deb_file(layout, name)]
    if missing:
        log.info("downloading %d arm64 packages (~12 MB)", len(missing))
        specs = [name if name in ARCH_ALL_DEBS else f"{name}:arm64" for name in missing]
        _run(["apt-get", "download", "-q", *specs], "apt-get download (arm64)", cwd=layout.deb_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    for name in _progress(layout.debs, "unpacking debs"):
        deb = _deb_file(layout, name)
        if deb is None:
            raise UserError(f"device provisioning: apt-get download gave no .deb for {name}")
        _run(["dpkg", "-x", str(deb), str(layout.root)], f"dpkg -x {deb.name}")
    if not layout.python.exists():
        raise UserError(f"device provisioning: {layout.python} missing after unpacking the debs")


def fetch_wheels(layout: EmulatorLayout) -> None:
    """pip download the aarch64 wheels into ``wheels/`` and unzip them into ``site-packages/``."""
    layout.wheel_dir.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    wheels = []
    for spec in _progress([_pin(s) for s in layout.wheels], "downloading wheels"):
        before = set(layout.wheel_dir.glob("*.whl"))
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--python-version", layout.python_version,
               *platforms, "-d", str(layout.wheel_dir), spec]
        out = _run(cmd, f"pip download {spec}")
        wheels.append(_downloaded_wheel(layout, spec, out, before))
    if layout.site_packages.exists():
        shutil.rmtree(layout.site_packages)  # no stale files from another version
    layout.site_packages.mkdir(parents=True)
    for wheel in _progress(wheels, "unpacking wheels"):
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(layout.site_packages)


def write_wrapper(layout: EmulatorLayout) -> None:
    """The emulated interpreter as a host script (no binfmt_misc: qemu runs it explicitly)."""
    qemu = shutil.which("qemu-aarch64-static")
    if qemu is None:
        raise UserError("device provisioning: qemu-aarch64-static not found (apt-get install qemu-user-static)")
    layout.wrapper.parent.mkdir(parents=True, exist_ok=True)
    layout.wrapper.write_text(
        "#!/bin/sh\n"
        "# An aarch64 Python 3.11 under qemu-user, with TVM on its path. Written by tvmshuffle.\n"
        f'exec "{qemu}" -L "{layout.root}" -U PYTHONHOME -E PYTHONNOUSERSITE=1 '
        f'-E PYTHONPATH="{layout.site_packages}" "{layout.python}" "$@"\n'
    )
    layout.wrapper.chmod(0o755)


def check_interpreter(layout: EmulatorLayout, timeout: float = 300) -> str:
    """Run ``import tvm`` through the wrapper; return the version, which must be ours."""
    code = "import tvm; print(tvm.__version__)"
    out = _run([str(layout.wrapper), "-c", code], "import tvm under emulation", timeout=timeout)
    version = out.strip().splitlines()[-1] if out.strip() else ""
    if version != TVM_VERSION:
        raise UserError(f"device provisioning: the emulated python imports tvm {version!r}, expected {TVM_VERSION}")
    return version


# --------------------------------------------------------------------------- helpers


def _stamp_content(layout: EmulatorLayout) -> dict:
    spec = {"layout": LAYOUT_VERSION, "debs": list(layout.debs), "wheels": [_pin(w) for w in layout.wheels],
            "python": layout.python_version, "tvm": TVM_VERSION}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return {**spec, "digest": digest}


def _read_stamp(layout: EmulatorLayout) -> dict | None:
    try:
        return json.loads(layout.stamp.read_text())
    except (OSError, ValueError):
        return None


def _pin(spec: str) -> str:
    """``numpy`` → ``numpy==<host venv's version>`` when the host has it; pinned specs stay."""
    if "=" in spec or "<" in spec or ">" in spec:
        return spec
    from importlib import metadata

    try:
        return f"{spec}=={metadata.version(spec)}"
    except metadata.PackageNotFoundError:
        return spec


def _normalise(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def _downloaded_wheel(layout: EmulatorLayout, spec: str, pip_output: str, before: set[Path]) -> Path:
    """The wheel file pip just fetched (or found already there) for ``spec``."""
    new = set(layout.wheel_dir.glob("*.whl")) - before
    if len(new) == 1:
        return new.pop()
    # Already downloaded: pip says "File was already downloaded /path/x.whl" or "Saved ...".
    for line in pip_output.splitlines():
        for word in line.split():
            if word.endswith(".whl") and Path(word).exists():
                return Path(word)
    name = _normalise(spec.split("=")[0])
    version = spec.split("==")[1] if "==" in spec else ""
    matches = sorted(w for w in layout.wheel_dir.glob("*.whl")
                     if _normalise(w.name.split("-")[0]) == name and (not version or w.name.split("-")[1] == version))
    if not matches:
        raise UserError(f"device provisioning: pip download {spec} left no wheel in {layout.wheel_dir}")
    return matches[-1]


def _deb_file(layout: EmulatorLayout, name: str) -> Path | None:
    arch = "all" if name in ARCH_ALL_DEBS else "arm64"
    found = sorted(layout.deb_dir.glob(f"{name}_*_{arch}.deb"))
    return found[-1] if found else None


def _apt_has(spec: str) -> bool:
    result = subprocess.run(["apt-cache", "show", spec], capture_output=True, text=True)
    return result.returncode == 0 and "Package:" in result.stdout


def _apt(args: list[str], what: str) -> str:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return _run(_sudo(["apt-get", *args]), what, env=env)


def _sudo(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return cmd
    if shutil.which("sudo") is None:
        raise UserError(f"device provisioning: `{' '.join(cmd)}` needs root (run as root or install sudo)")
    return ["sudo", "-n", *cmd]


def _run(cmd: list[str], what: str, cwd: Path | None = None, env: dict | None = None,
         timeout: float = 1800) -> str:
    """Run one step's command; any failure is a one-line :class:`UserError` naming the step."""
    log.debug("$ %s", " ".join(cmd))
    try:
        result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise UserError(f"device provisioning: {what}: command {cmd[0]!r} not found") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"device provisioning: {what}: no result after {timeout:.0f} s") from None
    if result.returncode != 0:
        lines = [ln.strip() for ln in (result.stderr + result.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith(("E:", "ERROR", "error"))] or lines
        detail = errors[-1] if errors else "no output"
        raise UserError(f"device provisioning: {what} failed (exit {result.returncode}): {detail}")
    return result.stdout


def _progress(items, what: str) -> Iterator:
    """Iterate with a tqdm bar on a terminal, else one log line per item."""
    items = list(items)
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, desc=what, unit="pkg", leave=False)
        return
    for i, item in enumerate(items, 1):
        log.info("  %s %d/%d: %s", what, i, len(items), getattr(item, "name", item))
        yield item


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One provisioning at a time per cache directory (other processes wait)."""
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)



"""Where a compiled model runs: this machine's CPU or a device behind a TVM RPC tracker, one
interface for both; ``run``, ``bench``, ``profile`` and ``study`` use it and never ask which.

:func:`open_device` picks the device from the ``--rpc-tracker``/``--rpc-key`` flags::

    with open_device(tracker, key, rpc_timeout, threads) as device:   # tracker None: this CPU
        vm = device.load_vm(lib_path)          # or device.vm(device.load_built(executable, preset))
        y = device.run(vm, x)
        times_ms = device.time(vm, repeat, number)
    print(device.latency_label + device.threads_note)

Either one is a context manager with

* ``step(what)``: says what comes next (on a device behind a tracker, each step is bounded by
  ``--rpc-timeout``: :class:`tvmshuffle.remote.Watchdog`; here a debug log line);
* ``cpu()``, ``tensor(array)``, ``load_module(path)``, ``load_vm(path)``, ``vm(module)``,
  ``load_built(built, preset)`` (a module built in this process: loaded as it is here, exported
  through :func:`tvmshuffle.targets.export_library` and uploaded for a device), ``run(vm, x)``
  and ``time(vm, repeat, number)``;
* ``threads`` (the pool's size where it runs, when ``--threads``/``--affinity`` configured it,
  through :func:`tvmshuffle.runtime.configure_threads`), ``emulated``, ``is_here`` and the
  names a report gives it: ``name``, ``place(preset)``, ``label``, ``latency_label``, ``threads_note``.

:class:`LocalDevice` is this machine; the device behind a tracker is
:class:`tvmshuffle.remote.Session`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from . import runtime
from .errors import UserError
from .runtime import ThreadConfig

log = logging.getLogger(__name__)


class LocalDevice:
    """This machine's CPU, with the interface of :class:`tvmshuffle.remote.Session`.

    ``threads`` (``--threads``/``--affinity``) configures TVM's pool in this process as the
    block starts (:func:`tvmshuffle.runtime.configure_local_threads`); nothing asked, the pool
    is left as it is.
    """

    #: the code runs in this process: modules outlive the block, a library's kernels can be
    #: timed where they are
    is_here = True
    emulated = False
    key = None
    tracker = None
    name = "this CPU"
    label = "this CPU"
    latency_label = "latency on this CPU"

    def __init__(self, threads: ThreadConfig | None = None) -> None:
        self.thread_config = threads or ThreadConfig()
        self.threads: int | None = None
        self._data = None

    def __enter__(self) -> LocalDevice:
        self.threads = runtime.configure_local_threads(self.thread_config)
        return self

    def __exit__(self, *exc) -> None:
        pass

    def place(self, preset=None) -> str:
        """This CPU named in full, for a report's heading: its model and the target's ``-mcpu``."""
        from . import targets

        mcpu = preset.target.get("mcpu", "generic") if preset is not None else targets.resolve("host").target["mcpu"]
        return f"this CPU ({targets.host_cpu_name()}, {mcpu})"

    @property
    def threads_note(self) -> str:
        """``", N threads"`` when ``--threads``/``--affinity`` configured the pool, else ``""``."""
        return f", {self.threads} threads" if self.threads else ""

    def step(self, what: str, seconds: float | None = None) -> None:
        log.debug("this CPU: %s", what)

    def cpu(self):
        import tvm

        return tvm.cpu()

    def tensor(self, array: np.ndarray):
        import tvm

        return tvm.runtime.tensor(array, self.cpu())

    def load_module(self, path: Path):
        """A shared library loaded in this process (:func:`tvmshuffle.runtime.load_module`)."""
        return runtime.load_module(path)

    def load_built(self, built, preset=None, name: str = "module"):
        """A module built in this process runs here as it is (nothing to export)."""
        return built

    def vm(self, module, name: str = "the library"):
        """A Relax VM on this CPU over a loaded module (or a VM executable)."""
        return runtime.open_vm(module, name)

    def load_vm(self, lib_path: Path):
        """A model library → Relax VM on this CPU (:func:`tvmshuffle.runtime.load_library`)."""
        return runtime.load_library(lib_path)

    def run(self, vm, x: np.ndarray) -> np.ndarray:
        """``main(x)`` here (:func:`tvmshuffle.runtime.run`); ``x`` is what :meth:`time` times."""
        output = runtime.run(vm, x).output
        self._data = self.tensor(x)
        return output

    def time(self, vm, repeat: int, number: int = 1) -> list[float]:
        """Per-repeat mean latency (ms) of ``main`` on the input of the last :meth:`run`."""
        return runtime.time_main(vm, self._data, repeat, number)


def where(device, preset=None) -> str:
    """Where timings were taken, for a report's heading: the device in full (:meth:`place`), its
    threads when configured, and, for an emulated device, that its times are not ARM's."""
    emulated = " (EMULATED under qemu on this host: not ARM timings)" if device.emulated else ""
    return device.place(preset) + device.threads_note + emulated


def open_device(tracker: str | None = None, key: str | None = None, rpc_timeout: float | None = None,
                threads: ThreadConfig | None = None, *, session_timeout: float = 600.0,
                here_threads: int | None = None):
    """The device the flags name, as a context manager: device ``key`` behind ``tracker``
    (:class:`tvmshuffle.remote.Session`, every step bounded by ``rpc_timeout`` s without an
    answer, a session lasting at most ``session_timeout`` s), or this CPU (:class:`LocalDevice`)
    when ``tracker`` is None.

    ``threads`` configures the pool where the code runs. ``here_threads``: the thread count this
    machine's pool gets when ``threads`` asks for none (``bench`` and ``study``: every core,
    as PyTorch and ONNX Runtime get); a device's pool is never given a count it was not asked for.
    """
    from . import remote

    threads = threads or ThreadConfig()
    if tracker:
        return remote.Session(tracker, key, rpc_timeout or remote.DEFAULT_RPC_TIMEOUT,
                              session_timeout=session_timeout, threads=threads)
    if threads.threads is None and here_threads is not None:
        threads = ThreadConfig(here_threads, threads.affinity)
    return LocalDevice(threads)


def check_device(preset, tracker: str | None, key: str | None, rpc_timeout: float | None = None,
                 wait: bool = False) -> None:
    """The flags that say where the code runs, checked before anything slow: ``--rpc-tracker``
    and ``--rpc-key`` together, ``--rpc-timeout`` > 0, and a device behind a tracker for code
    that cannot run on this machine (a cross target). ``wait``: also that the tracker answers
    and has a free device ``key`` (:func:`tvmshuffle.remote.check_rpc` waits for one)."""
    from . import remote

    remote.check_rpc_args(tracker, key, remote.DEFAULT_RPC_TIMEOUT if rpc_timeout is None else rpc_timeout)
    if preset is not None and preset.is_cross and not tracker:
        raise UserError(f"--target {preset.name}: code for it cannot run here; give --rpc-tracker and --rpc-key")
    if wait and tracker:
        remote.check_rpc(tracker, key)

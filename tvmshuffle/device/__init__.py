"""An aarch64 device without a phone: TVM's RPC server on an arm64 Python under qemu-user.

* :func:`provision` — download (once, into a cache dir outside the repo) an arm64 Python 3.11
  root from Debian and TVM's aarch64 wheels from PyPI; write the qemu wrapper script.
* :func:`up` / :func:`status` / :func:`down` — start, inspect and stop a TVM RPC tracker and
  the emulated RPC server registered under a key (``emu-aarch64``), on 127.0.0.1.

Run models on it with :func:`tvmshuffle.remote.run_remote`. Its timings are qemu timings on
this host: label them emulated, never report them as ARM latency.
"""

from .provisioning import EmulatorLayout, ProvisionResult, default_cache_dir, is_provisioned, provision
from .service import DEFAULT_KEY, DEFAULT_TRACKER_PORT, DeviceConfig, down, status, up

__all__ = [
    "DEFAULT_KEY", "DEFAULT_TRACKER_PORT", "DeviceConfig", "EmulatorLayout", "ProvisionResult",
    "default_cache_dir", "down", "is_provisioned", "provision", "status", "up",
]

"""Start TVM's RPC server inside the emulated aarch64 Python. Run by :mod:`.service`, never imported.

Usage: ``WRAPPER _rpc_server_main.py WRAPPER [tvm.exec.rpc_server flags ...]``

``rpc.Server`` runs its serving loop in a popen worker started with ``sys.executable``, which
under qemu-user is the aarch64 ``python3.11`` ELF: without binfmt_misc the host cannot exec it
(``OSError: [Errno 8] Exec format error``). Pointing ``sys.executable`` at the wrapper script
(which runs qemu explicitly) first makes the worker start under emulation too.

This file runs on the emulated interpreter: it imports nothing from tvmshuffle.
"""

import runpy
import sys


def main() -> None:
    sys.executable = sys.argv[1]
    sys.argv = ["tvm.exec.rpc_server", *sys.argv[2:]]
    runpy.run_module("tvm.exec.rpc_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

"""Start TVM's RPC server inside the emulated aarch64 Python. Run by :mod:`.service`, never imported.

Usage: ``WRAPPER _rpc_server_main.py WRAPPER [tvm.exec.rpc_server flags ...]``

Two things differ from ``python -m tvm.exec.rpc_server``, both because of qemu-user:

* **The interpreter.** ``rpc.Server`` runs its serving loop in a popen worker started with
  ``sys.executable``, which under qemu-user is the aarch64 ``python3.11`` ELF: without
  binfmt_misc the host cannot exec it (``OSError: [Errno 8] Exec format error``). Pointing
  ``sys.executable`` (and ``multiprocessing``'s executable) at the wrapper script, which runs
  qemu explicitly, makes every process it starts run under emulation too.
* **No fork of a threaded process.** The serving loop starts each session in a
  ``multiprocessing`` child. With the default ``fork`` start method that child is forked from
  the popen worker, a multithreaded emulated process, and such a fork can deadlock in the child
  under qemu-user (seen: the log ends at ``start serving at /tmp/…``, the child sits on a futex
  at 0 s of CPU, the client waits for ever). Here the popen worker uses the ``forkserver``
  start method instead: one single-threaded emulated process, started (fork + exec) before the
  first session, with TVM already imported, forks every session. The fork happens where no
  other thread exists, and a session still starts in well under a second instead of the
  ~15 s an emulated ``import tvm`` takes with ``spawn`` (``--no-fork``).

This file runs on the emulated interpreter: it imports nothing from tvmshuffle.
"""

import argparse
import logging
import sys


def _use_forkserver(wrapper: str) -> None:
    """In the popen worker (``server_init_callback``): sessions come from a forkserver."""
    import multiprocessing
    from multiprocessing import forkserver

    sys.executable = wrapper
    multiprocessing.set_executable(wrapper)
    multiprocessing.set_start_method("forkserver", force=True)
    multiprocessing.set_forkserver_preload(["tvm", "tvm.rpc.server", "numpy"])
    # Start the forkserver and wait until it has imported the preload and forked once: only then
    # does the server register with the tracker. Otherwise the first session waits for that
    # import (~15 s emulated, over a minute on a slow, busy host) inside its own time budget, and
    # a runner's 60 s timeout can expire before the session has started.
    forkserver.ensure_running()
    warmup = multiprocessing.Process(target=sum, args=((),))
    warmup.start()
    warmup.join()


def main() -> None:
    wrapper = sys.argv[1]
    sys.executable = wrapper
    parser = argparse.ArgumentParser(prog="_rpc_server_main.py")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--port-end", type=int, default=9199)
    parser.add_argument("--tracker", required=True, help="HOST:PORT")
    parser.add_argument("--key", required=True)
    args = parser.parse_args(sys.argv[2:])
    logging.basicConfig(level=logging.INFO)

    from tvm import rpc

    host, port = args.tracker.rsplit(":", 1)
    # reuse_addr=False: with SO_REUSEADDR two servers started at once (``device up --count N``)
    # can bind the same free port, and the second dies at listen() with EADDRINUSE (seen in CI);
    # without it the second one's bind fails and TVM moves on to the next port of the range
    server = rpc.Server(args.host, args.port, args.port_end, key=args.key, tracker_addr=(host, int(port)),
                        server_init_callback=lambda: _use_forkserver(wrapper), reuse_addr=False)
    server.proc.join()


if __name__ == "__main__":
    main()

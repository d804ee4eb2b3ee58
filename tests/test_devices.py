"""One device interface, here and behind an RPC tracker (:mod:`tvmshuffle.devices`): the same
tiny library and the same built kernel run through ``open_device(None, …)`` (this CPU) and
through a real tracker + host RPC server on 127.0.0.1, and give the same results."""

from __future__ import annotations

import numpy as np
import pytest

from tvmshuffle import devices, remote, targets
from tvmshuffle.errors import UserError
from tvmshuffle.runtime import ThreadConfig

SHAPE = (2, 8)


@pytest.fixture(scope="module")
def tiny_library(tmp_path_factory):
    """``main(x) = relu(x) + 1`` on a (2, 8) tensor, built for this CPU and exported."""
    from tvm import relax

    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(SHAPE), "float32"))
    with builder.function("main", [x]):
        y = builder.emit(relax.op.add(relax.op.nn.relu(x), relax.const(1.0, "float32")))
        builder.emit_func_output(y)
    tiny = builder.get()
    preset = targets.resolve("host")
    path = tmp_path_factory.mktemp("tiny") / "tiny.so"
    targets.export_library(relax.build(tiny, target=targets.tvm_target(preset)), preset, path)
    return path


def _add_one():
    """A TIR kernel ``main(a, b)``: ``b = a + 1`` over 16 floats, built for this CPU."""
    import tvm
    from tvm import te

    a = te.placeholder((16,), "float32", name="a")
    b = te.compute((16,), lambda i: a[i] + 1.0, name="b")
    func = te.create_prim_func([a, b]).with_attr("global_symbol", "main")
    return tvm.tirx.build(tvm.IRModule({"main": func}), targets.tvm_target(targets.resolve("host")))


def _exercise(device, library):
    """Every part of the interface, the same calls whichever device it is."""
    x = np.linspace(-1.0, 1.0, num=int(np.prod(SHAPE)), dtype="float32").reshape(SHAPE)
    with device:
        device.step("the first step")
        vm = device.load_vm(library)
        y = device.run(vm, x)
        times = device.time(vm, repeat=3, number=2)
        kernel = device.load_built(_add_one(), targets.resolve("host"), "add_one")
        a = device.tensor(np.arange(16, dtype="float32"))
        b = device.tensor(np.zeros(16, "float32"))
        kernel["main"](a, b)
        added = b.numpy()
        timed = kernel.time_evaluator("main", device.cpu(), number=1, repeat=2)(a, b).results
        vm = kernel = a = b = None
    return {"y": y, "times": times, "added": added, "timed": list(timed),
            "label": device.label, "latency_label": device.latency_label, "name": device.name,
            "threads_note": device.threads_note, "emulated": device.emulated}


@pytest.mark.rpc
@pytest.mark.timeout(300)
def test_this_cpu_and_a_device_behind_a_tracker_give_the_same_interface(tiny_library, rpc_env):
    here = devices.open_device(None, None, 30, ThreadConfig(1))
    there = devices.open_device(rpc_env.tracker, rpc_env.key, 30, ThreadConfig(1))
    assert isinstance(here, devices.LocalDevice) and isinstance(there, remote.Session)
    assert here.is_here and not there.is_here
    public = {"step", "cpu", "tensor", "load_module", "load_vm", "vm", "load_built", "run", "time", "place",
              "threads", "emulated", "is_here", "name", "label", "latency_label", "threads_note",
              "__enter__", "__exit__"}
    assert public <= set(dir(here)) and public <= set(dir(there))

    local = _exercise(here, tiny_library)
    rpc = _exercise(there, tiny_library)
    expected = np.maximum(np.linspace(-1.0, 1.0, num=16, dtype="float32").reshape(SHAPE), 0) + 1
    for result in (local, rpc):
        np.testing.assert_allclose(result["y"], expected, rtol=1e-6)
        np.testing.assert_array_equal(result["added"], np.arange(16, dtype="float32") + 1)
        assert len(result["times"]) == 3 and all(t > 0 for t in result["times"])
        assert len(result["timed"]) == 2 and all(t > 0 for t in result["timed"])
        assert result["threads_note"] == ", 1 threads" and not result["emulated"]
    assert (local["name"], local["label"], local["latency_label"]) == ("this CPU", "this CPU", "latency on this CPU")
    assert rpc["name"] == rpc_env.key and rpc["latency_label"] == f"latency on {rpc_env.key}"
    assert rpc["label"] == f"device {rpc_env.key!r} via {rpc_env.tracker}"
    assert here.place(targets.resolve("host")).startswith("this CPU (")
    assert there.place() == f"{rpc_env.key} via {rpc_env.tracker}"


def test_no_threads_asked_leaves_the_pool_and_says_nothing():
    with devices.open_device(None) as device:
        assert device.threads is None and device.threads_note == ""


def test_here_threads_fill_in_only_for_this_cpu():
    assert devices.open_device(None, here_threads=3).thread_config == ThreadConfig(3)
    assert devices.open_device(None, threads=ThreadConfig(2), here_threads=3).thread_config == ThreadConfig(2)
    there = devices.open_device("127.0.0.1:9", "k", 5, ThreadConfig(None, "big"), here_threads=3)
    assert there.thread_config == ThreadConfig(None, "big")


def test_a_missing_library_names_the_file(tmp_path):
    with devices.open_device(None) as device, pytest.raises(UserError, match="no such file"):
        device.load_vm(tmp_path / "none.so")


@pytest.mark.parametrize("tracker, key, target, needle", [
    ("127.0.0.1:9190", None, "host", "go together"),
    (None, "k", "host", "go together"),
    (None, None, "aarch64", "cannot run here; give --rpc-tracker and --rpc-key"),
    ("no-port", "k", "host", "expected HOST:PORT"),
])
def test_where_the_code_runs_is_checked_by_one_helper(tracker, key, target, needle):
    with pytest.raises(UserError, match=needle):
        devices.check_device(targets.resolve(target), tracker, key, 10)
    with pytest.raises(UserError, match="--rpc-timeout must be > 0"):
        devices.check_device(None, None, None, 0)

"""Fused vs unfused: end-to-end and shuffle-adjacent per-layer latency on this CPU.

For each model: import once, lower with and without FuseShuffleGroupConv, build both (with
tuning records when given / shipped), then time both in this one process, interleaved, median
of >= 30 runs. Per layer: each fused shuffle+conv kernel against the unfused convolution it
replaced (same output, weight and MACs); the unfused side also pays its shuffle kernels.

    python scripts/bench_fusion.py [--models shufflenet_v1_g3_x1_0 shufflenet_v2_x1_0]
                                   [--runs 30] [--threads 2] [--tuned] [--json out/bench_fusion.json]
"""

from __future__ import annotations

import argparse
import json
import os

from pathlib import Path

import numpy as np

from tvmshuffle.targets import host_cpu_name


def _signature(kernel):
    """What identifies one convolution layer in both builds: output, weight shape, MACs."""
    weight = kernel.inputs[1] if len(kernel.inputs) > 1 else None
    return (str(kernel.outputs), str(weight), kernel.macs)


def pair_layers(unfused_rows, fused_rows):
    """Per shuffle-adjacent layer: (fused kernel, the unfused conv kernel it replaced)."""
    by_signature = {_signature(r.kernel): r for r in unfused_rows if r.kernel.macs}
    return [(f, by_signature.get(_signature(f.kernel))) for f in fused_rows if f.kernel.fused_shuffle_conv]


def bench_model(name: str, runs: int, tuned: bool):
    import tvm

    from tvmshuffle import frontend, kernels, pipeline, profile, runtime, targets
    from tvmshuffle.records import records_dir_for, records_key

    preset = targets.resolve("host")
    imported = frontend.load(name)
    x = imported.random_input()
    expected = imported.reference(x)
    result = {"model": name, "variants": {}}
    vms, profiles = {}, {}
    for fused in (False, True):
        label = "fused" if fused else "unfused"
        mod = pipeline.lower(imported.mod, preset, fuse=fused)
        records = None
        if tuned:
            candidate = records_dir_for(preset, records_key(name, fused, imported.input_shape))
            records = candidate if candidate.exists() else None
        executable, tuned_kernels, _ = pipeline.build(mod, preset, records)
        vm = tvm.relax.VirtualMachine(executable, tvm.cpu())
        out = runtime.run(vm, x).output
        _, err = runtime.check(out, expected, tolerance=1e-4)
        rows = profile.time_kernels(profile.kernel_library(executable), kernels.list_kernels(mod))
        vms[label] = vm
        profiles[label] = rows
        result["variants"][label] = {
            "tuned_kernels": tuned_kernels,
            "max_rel_error": err,
            "kernels": len(rows),
            "standalone_shuffle_kernels": sum(r.kernel.standalone_shuffle for r in rows),
            "shuffle_kernels_ms": sum(r.total_ms for r in rows if r.kernel.standalone_shuffle),
            "kernels_sum_ms": sum(r.total_ms for r in rows),
        }
    layers = []
    for fused, unfused in pair_layers(profiles["unfused"], profiles["fused"]):
        layers.append({
            "fused_kernel": fused.kernel.name, "outputs": fused.kernel.outputs, "calls": fused.kernel.calls,
            "macs": fused.kernel.macs, "fused_ms": fused.median_ms,
            "unfused_kernel": unfused.kernel.name if unfused else None,
            "unfused_ms": unfused.median_ms if unfused else None,
        })
    result["layers"] = layers
    result["variants"]["fused"]["shuffle_adjacent_ms"] = sum(l["fused_ms"] * l["calls"] for l in layers)
    result["variants"]["unfused"]["shuffle_adjacent_ms"] = (
        sum((l["unfused_ms"] or 0) * l["calls"] for l in layers) + result["variants"]["unfused"]["shuffle_kernels_ms"]
    )
    # End to end, interleaved so that both see the same machine state.
    samples = {label: [] for label in vms}
    data = tvm.runtime.tensor(x, tvm.cpu())
    for _ in range(runs):
        for label, vm in vms.items():
            timer = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=1)
            samples[label].append(timer(data).results[0] * 1e3)
    for label, times in samples.items():
        result["variants"][label]["median_ms"] = float(np.median(times))
        result["variants"][label]["p10_ms"] = float(np.percentile(times, 10))
        result["variants"][label]["p90_ms"] = float(np.percentile(times, 90))
    v = result["variants"]
    result["fused_speedup"] = v["unfused"]["median_ms"] / v["fused"]["median_ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["shufflenet_v1_g3_x1_0", "shufflenet_v2_x1_0"])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--tuned", action="store_true", help="apply the records in tuning_logs/host/<model>[-unfused]")
    parser.add_argument("--json", default="out/bench_fusion.json")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    report = {"cpu": host_cpu_name(), "threads": args.threads,
              "runs": args.runs, "tuned": args.tuned, "models": []}
    for name in args.models:
        r = bench_model(name, args.runs, args.tuned)
        report["models"].append(r)
        u, f = r["variants"]["unfused"], r["variants"]["fused"]
        print(f"{name}: unfused {u['median_ms']:.2f} ms ({u['standalone_shuffle_kernels']} shuffle kernels, "
              f"{u['shuffle_kernels_ms']:.2f} ms in them), fused {f['median_ms']:.2f} ms "
              f"({f['standalone_shuffle_kernels']} shuffle kernels) -> x{r['fused_speedup']:.3f}; "
              f"shuffle-adjacent layers {u['shuffle_adjacent_ms']:.2f} -> {f['shuffle_adjacent_ms']:.2f} ms")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""``tvmshuffle`` command line: parses flags and calls the Python API; nothing else.

Every user mistake ends as one line ``tvmshuffle: error: ...`` and exit code 2
(``--verbose`` adds the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from .errors import UserError, writable_output

log = logging.getLogger("tvmshuffle")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage + message otherwise)
        raise UserError(f"{self.prog}: {message}")


# --------------------------------------------------------------------------- commands


def cmd_models(args) -> int:
    from .frontend import DEFAULT_INPUT_SHAPE, parse_input_shape
    from .models import zoo

    shape = parse_input_shape(args.input_shape) or DEFAULT_INPUT_SHAPE
    rows = zoo.model_table(input_shape=shape)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<26} {'MACs (M)':>9} {'params (M)':>11}   input {'x'.join(map(str, shape))}")
    for row in rows:
        print(f"{row['name']:<26} {row['macs'] / 1e6:>9.1f} {row['params'] / 1e6:>11.2f}")
    return 0


def cmd_compile(args) -> int:
    from .frontend import parse_input_shape
    from .pipeline import CompileConfig, compile_model, parse_dump_code

    config = CompileConfig(
        target=args.target,
        fuse=not args.no_fuse,
        tuning_records=Path(args.tuning_records) if args.tuning_records else None,
        cross_compiler=args.cross_compiler,
        input_shape=parse_input_shape(args.input_shape),
        weights=args.weights,
        schedules=args.schedules,
        dump_code=parse_dump_code(args.dump_code or ()),
        force_records=args.force_records,
    )
    result = compile_model(args.model, Path(args.output), config)
    tuned = f", {result.tuned_kernels} with tuned schedules" if config.tuning_records else ""
    if config.schedules != "none":
        tuned += f", {result.hand_kernels} with {config.schedules} schedules"
    print(
        f"{result.output}: {result.model.name} for {result.target.name} "
        f"({result.kernels} kernels{tuned}, {'fused' if config.fuse else 'unfused'}, "
        f"input {'x'.join(map(str, result.model.input_shape))}) in {result.seconds:.1f} s"
    )
    for kind, path in result.dumps.items():
        print(f"{kind}: {path}")
    return 0


def cmd_run(args) -> int:
    import numpy as np

    from . import frontend, pipeline, runtime
    from .devices import check_device, open_device

    if args.repeat < 0 or args.number < 1:
        raise UserError("--repeat must be >= 0 and --number >= 1")
    if args.output:
        writable_output(args.output, "--output")  # before running, not after
    check_device(None, args.rpc_tracker, args.rpc_key, args.rpc_timeout)
    threads = _threads(args)
    if args.print_top is not None and args.print_top < 1:
        raise UserError(f"--print-top must be >= 1, got {args.print_top}")
    library = Path(args.library)
    if not library.is_file():
        raise UserError(f"{library}: no such file")
    meta = pipeline.read_metadata(library)
    if args.fill_mode:
        shape = meta.get("input_shape") if meta else None
        if not shape:
            raise UserError(f"--fill-mode {args.fill_mode}: no input shape for {library} (its "
                            f"{pipeline.metadata_path(library).name} from `tvmshuffle compile` is "
                            "not beside it); give --input X.npy")
        x = runtime.fill_input(args.fill_mode, shape)
    else:
        x = runtime.load_input(args.input)
    repeat = args.repeat or (10 if args.print_time else 0)
    with open_device(args.rpc_tracker, args.rpc_key, args.rpc_timeout, threads) as device:
        vm = device.load_vm(args.library)
        y = device.run(vm, x)
        times_ms = device.time(vm, repeat, args.number) if repeat > 0 else []
        vm = None
    where = device.latency_label + device.threads_note
    summary = f"output {y.dtype}{list(y.shape)}: mean {y.mean():.6g}, std {y.std():.6g}"
    if args.print_top is None:
        print(f"{summary}, top-5 {[c for _, c, _ in runtime.top_classes(y, 5)]}")
    else:
        top = runtime.top_classes(y, args.print_top)
        image = " of image 0" if y.ndim > 1 and y.shape[0] > 1 else ""
        print(f"{summary}; top {len(top)}{image} (rank class score):")
        for rank, cls, score in top:
            print(f"{rank:4d} {cls:6d} {score:12.6g}")
    if times_ms:
        t = np.array(times_ms)
        print(f"{where}: median {np.median(t):.3f} ms, p10 {np.percentile(t, 10):.3f}, "
              f"p90 {np.percentile(t, 90):.3f} ms over {len(t)} x {args.number} runs")
    if args.output:
        np.save(args.output, y)
        print(f"saved {args.output}")
    if args.check and meta:
        expected = frontend.reference(meta["model"], meta.get("weights"))(x)
        ok, err = runtime.check(y, expected, args.tolerance)
        print(f"check against {'ONNX Runtime' if meta['model'].endswith('.onnx') else 'PyTorch'} "
              f"on the host ({meta['model']}): max relative error {err:.2e} -> {'OK' if ok else 'MISMATCH'}")
        if not ok:
            raise UserError(f"{args.library}: output differs from the reference (error {err:.2e} > {args.tolerance})")
    return 0


def cmd_tune(args) -> int:
    import dataclasses

    from . import frontend, pipeline, targets, tuning
    from .records import records_dir_for, records_key

    # the flags are checked before the slow import; the records dir may need the model's name
    measure = {k: v for k, v in (("number", args.number), ("repeat", args.repeat),
                                 ("min_repeat_ms", args.min_repeat_ms),
                                 ("search_population", args.search_population),
                                 ("builder_timeout_sec", args.timeout),
                                 ("runner_timeout_sec", args.timeout)) if v is not None}
    config = tuning.TuneConfig(trials=args.trials, records_dir=Path(args.tuning_records or "."),
                               rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key,
                               device_wait_sec=args.rpc_timeout, trials_per_batch=args.trials_per_batch,
                               seed_schedules=args.schedules, threads=args.threads,
                               affinity=args.affinity, cache=args.cache, duel=not args.no_duel, **measure)
    preset = targets.resolve(args.target, args.cross_compiler)
    imported = frontend.load(args.model, frontend.parse_input_shape(args.input_shape), args.weights)
    records = Path(args.tuning_records) if args.tuning_records else records_dir_for(
        preset, records_key(imported.name, not args.no_fuse, imported.input_shape))
    config = dataclasses.replace(config, records_dir=records)
    mod = pipeline.lower(imported.mod, preset, fuse=not args.no_fuse)
    result = tuning.tune(mod, preset, config)
    where = "on this CPU"
    if args.rpc_key:
        from .remote import is_emulated_key

        where = f"on {args.rpc_key}" + (" (EMULATED: not an ARM latency)" if is_emulated_key(args.rpc_key) else "")
    est = f"{result.est_latency_ms:.3f} ms" if result.est_latency_ms is not None else "n/a (a task is unmeasured)"
    print(f"{records}: {len(result.tasks)} tasks, {result.trials_run} trials this run, "
          f"{result.trials_total} in total, measured {where}; estimated network latency {est}; "
          f"{result.wall_time_s:.0f} s")
    print(f"compile with: tvmshuffle compile {args.model} --target {args.target} --tuning-records {records}"
          + (" --no-fuse" if args.no_fuse else ""))
    return 0


def cmd_bench(args) -> int:
    from . import bench
    from .frontend import parse_input_shape

    _threads(args)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            writable_output(path, flag)  # before the bench, not after
    config = bench.BenchConfig(
        target=args.target, tuning_records=Path(args.tuning_records) if args.tuning_records else None,
        threads=args.threads, affinity=args.affinity, repeat=args.repeat,
        input_shape=parse_input_shape(args.input_shape),
        weights=args.weights, rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key, rounds=args.rounds,
        rpc_timeout=args.rpc_timeout, force_records=args.force_records,
    )
    report = bench.bench(args.model, config)
    print(bench.markdown(report))  # stdout: the table alone (`bench ... > table.md`)
    if args.json:
        Path(args.json).write_text(json.dumps(report.as_dict(), indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        print(f"wrote {bench.plot(report, Path(args.plot))}", file=sys.stderr)
    wrong = [r.variant for r in report.rows if r.correct is False]
    if wrong:
        raise UserError(f"outputs differ from PyTorch: {', '.join(wrong)}")
    return 0


def cmd_profile(args) -> int:
    from . import pipeline, profile, targets
    from .devices import check_device, open_device
    from .frontend import parse_input_shape

    check_device(targets.resolve(args.target), args.rpc_tracker, args.rpc_key, args.rpc_timeout)
    threads = _threads(args)
    config = pipeline.CompileConfig(
        target=args.target, fuse=not args.no_fuse, input_shape=parse_input_shape(args.input_shape),
        weights=args.weights, tuning_records=Path(args.tuning_records) if args.tuning_records else None,
        schedules=args.schedules, force_records=args.force_records)
    device = open_device(args.rpc_tracker, args.rpc_key, args.rpc_timeout, threads)
    result = profile.profile(args.model, config, device, args.number, args.repeat, args.in_model)
    print(json.dumps(result.as_dict(), indent=2) if args.json else profile.markdown(result))
    return 0


def cmd_device(args) -> int:
    from . import device

    if args.count < 1:
        raise UserError(f"--count must be >= 1, got {args.count}")
    if args.action == "up":
        info = device.up(key=args.key, tracker_port=args.tracker_port, host=args.host, count=args.count)
    elif args.action == "status":
        info = device.status(tracker_port=args.tracker_port, host=args.host)
    else:
        stopped = device.down(tracker_port=args.tracker_port, host=args.host)
        info = {"stopped": stopped}
    if args.json or args.action == "down":
        print(json.dumps(info, indent=2))
        return 0
    print(f"tracker {info['tracker']}: {'up' if info['tracker_up'] else 'down'}")
    print(f"devices registered: {', '.join(info['keys']) or 'none'}")
    for server in info.get("servers", []):
        print(f"  {server['key']:<20} {server['address']:<22} {server['state']}")
    for name, pid in info.get("pids", {}).items():
        print(f"  {name}: pid {pid['pid']} {'alive' if pid['alive'] else 'dead'}")
    if info["keys"]:
        key = info["keys"][0]
        print(f"use: --rpc-tracker {info['tracker']} --rpc-key {key}   (emulated aarch64: timings are not ARM timings)")
    return 0


def cmd_inspect(args) -> int:
    from . import frontend, kernels, pipeline, targets

    preset = targets.resolve(args.target)
    imported = frontend.load(args.model, frontend.parse_input_shape(args.input_shape), args.weights)
    mod = pipeline.lower(imported.mod, preset, fuse=not args.no_fuse)
    rows = kernels.list_kernels(mod)
    shuffles = sum(k.standalone_shuffle for k in rows)
    fused = sum(k.fused_shuffle_conv for k in rows)
    if args.json:
        print(json.dumps({
            "model": imported.name,
            "target": preset.name,
            "fused": not args.no_fuse,
            "input_shape": list(imported.input_shape),
            "kernels": [k.as_dict() for k in rows],
            "standalone_shuffle_kernels": shuffles,
            "standalone_shuffle_calls": sum(k.calls for k in rows if k.standalone_shuffle),
            "fused_shuffle_conv_kernels": fused,
            "total_macs": sum(k.macs * k.calls for k in rows),
        }, indent=2))
        return 0
    print(f"{imported.name} ({'fused' if not args.no_fuse else 'unfused'}), input {list(imported.input_shape)}")
    print(f"{'kernel':<48} {'output':<20} {'MACs (M)':>9}  note")
    for k in rows:
        note = "STANDALONE SHUFFLE" if k.standalone_shuffle else ("shuffle fused" if k.fused_shuffle_conv else "")
        calls = f" x{k.calls}" if k.calls > 1 else ""
        outputs = " ".join(map(str, k.outputs))
        print(f"{k.name + calls:<48} {outputs:<20} {k.macs / 1e6:>9.3f}  {note}")
    print(f"{len(rows)} kernels, {shuffles} standalone shuffle kernels, {fused} fused shuffle+conv kernels")
    return 0


def cmd_study(args) -> int:
    from . import study
    from .frontend import DEFAULT_INPUT_SHAPE, parse_input_shape

    _threads(args)
    if args.output_dir:
        writable_output(args.output_dir, "-o", directory=True)  # before the study, not after
    config = study.StudyConfig(
        target=args.target, models=args.model, input_shape=parse_input_shape(args.input_shape) or DEFAULT_INPUT_SHAPE,
        tuning_records=Path(args.tuning_records) if args.tuning_records else None,
        trials_per_layer=args.trials_per_layer, rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key,
        rpc_timeout=args.rpc_timeout,
        number=args.number, repeat=args.repeat, layers_limit=args.limit, threads=args.threads,
        affinity=args.affinity,
    )
    report = study.run_study(config)
    out = study.write_outputs(report, Path(args.output_dir or Path("out") / "study" / report.target))
    print(json.dumps(study.to_json(report), indent=2) if args.json else study.markdown(report))
    print(f"wrote {out['markdown']}, {out['json']}, {out['plot']}", file=sys.stderr if args.json else sys.stdout)
    return 0


# --------------------------------------------------------------------------- parser


def _add_model_args(p) -> None:
    p.add_argument("model", help="zoo name (see `tvmshuffle models`), a .pt2 (torch.export.save) or an .onnx file")
    p.add_argument("--input-shape", help="N,C,H,W (default 1,3,224,224; a file's own shape)")
    p.add_argument("--weights", help="state_dict file for a zoo model (default: random init, seed 0)")


def _add_rpc_args(p, what: str, timeout: float | None = None) -> None:
    from .remote import DEFAULT_RPC_TIMEOUT

    timeout = timeout or DEFAULT_RPC_TIMEOUT
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help=f"a TVM RPC tracker: {what}")
    p.add_argument("--rpc-key", help="device key at the tracker (e.g. emu-aarch64)")
    p.add_argument("--rpc-timeout", type=float, default=timeout, metavar="SECONDS",
                   help="give up on a device that answers nothing (or is not free) for this long "
                        f"in one step (default {timeout:g})")


def _add_thread_args(p, default: str) -> None:
    p.add_argument("--threads", type=int, metavar="N",
                   help=f"TVM's thread pool where the model runs (a device's through its RPC session): N "
                        f"threads (default: {default})")
    p.add_argument("--affinity", choices=["big", "little", "default"],
                   help="pin TVM's threads to the big cores first, the little ones, or leave them "
                        "(default); as on a big.LITTLE phone")


def _threads(args):
    """``--threads``/``--affinity`` checked (one line, exit 2) before anything slow."""
    from .runtime import ThreadConfig

    return ThreadConfig(args.threads, args.affinity)


def _add_force_records_arg(p) -> None:
    p.add_argument("--force-records", action="store_true",
                   help="apply records tuned on another CPU of the same ISA (by default they are set "
                        "aside with a note: tuning records belong to the CPU that measured them)")


def _add_schedules_arg(p, what: str = "schedule the kernels they fit; with --tuning-records each kernel "
                                      "gets the faster of a record and its hand schedule") -> None:
    p.add_argument("--schedules", default="hand", metavar="hand|none|DIR",
                   help=f"hand schedules: hand = the shipped schedules/ (default), none = TVM alone (the "
                        f"untuned baseline), or a directory of schedule files like schedules/; they {what}")


def build_parser() -> argparse.ArgumentParser:
    from . import device  # its defaults (no TVM import)

    parser = _Parser(prog="tvmshuffle", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("models", help="list the model zoo with MACs and parameters")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--input-shape", help="N,C,H,W for the MAC count (default 1,3,224,224)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("compile", help="compile a model into one deployable shared library")
    _add_model_args(p)
    p.add_argument("--target", default="host", help="preset (host, aarch64, rpi4, android-arm64) or TVM target JSON")
    p.add_argument("-o", "--output", required=True, help="output .so")
    p.add_argument("--no-fuse", action="store_true", help="leave channel shuffles as they are")
    p.add_argument("--tuning-records", help="MetaSchedule records dir (tuning_logs/<target>/<model>)")
    _add_force_records_arg(p)
    _add_schedules_arg(p)
    p.add_argument("--cross-compiler", help="linker command for the .so (overrides the preset's)")
    p.add_argument("--dump-code", action="append", metavar="asm|tir|relax",
                   help="also write the assembly (<output>.s), the scheduled kernels (<output>.tir.py) "
                        "or the Relax graph as built (<output>.relax.py); comma-separated or repeated")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("inspect", help="list the compiled kernels and count standalone shuffles")
    _add_model_args(p)
    p.add_argument("--target", default="host", help="target preset or TVM target JSON (default host)")
    p.add_argument("--no-fuse", action="store_true", help="inspect without FuseShuffleGroupConv")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("run", help="run a compiled library here or on a device behind an RPC tracker")
    p.add_argument("library", help="a .so from `tvmshuffle compile`")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="input tensor as .npy (float32, N,C,H,W)")
    source.add_argument("--fill-mode", choices=["zeros", "ones", "random"],
                        help="instead of --input: a generated input of the shape in the library's "
                             ".so.json: zeros, ones or random (standard normal, seed 0)")
    p.add_argument("--output", help="save the output here (.npy)")
    p.add_argument("--repeat", type=int, default=0, help="timed samples (default 0; 10 with --print-time)")
    p.add_argument("--number", type=int, default=1, help="runs averaged per sample")
    p.add_argument("--print-time", action="store_true", help="print the latency")
    p.add_argument("--print-top", type=int, metavar="N",
                   help="print the N highest-scoring classes (rank class score) of the first image")
    _add_rpc_args(p, "run on the device there")
    _add_thread_args(p, "here TVM_NUM_THREADS or every core; a device's pool as it is")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="do not compare with PyTorch/ONNX Runtime on the host (done when model.so.json is there)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max error relative to the output scale")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("tune", help="tune the kernels with MetaSchedule (+XGBoost), here or on an RPC device")
    _add_model_args(p)
    p.add_argument("--target", default="host", help="target preset or TVM target JSON (default host)")
    p.add_argument("--trials", type=int, required=True, help="trial budget for the records (resumes: trials there count)")
    _add_rpc_args(p, "measure on the device there", timeout=300.0)
    p.add_argument("--tuning-records", help="records dir (default tuning_logs/<target>/<model>[-unfused])")
    p.add_argument("--no-fuse", action="store_true", help="tune the unfused module (for comparison)")
    p.add_argument("--trials-per-batch", type=int, default=64, help="candidates measured per batch")
    p.add_argument("--cache", choices=("cold", "warm"), default="cold",
                   help="time each candidate as the model runs it: its weights and output evicted from the "
                        "caches before each call (cold, the default), or repeated on hot caches (warm: "
                        "MetaSchedule's default)")
    p.add_argument("--no-duel", action="store_true",
                   help="skip the end's duel: each kernel's best record timed against its hand schedule side by "
                        "side, the hand schedule kept where it is not slower (hand_wins.json; here only, not over RPC)")
    p.add_argument("--number", type=int, help="runs averaged per measurement of a candidate (default: cold 1, warm 3)")
    p.add_argument("--repeat", type=int, help="measurements per candidate, median kept (default: cold 10, warm 1)")
    p.add_argument("--min-repeat-ms", type=int, metavar="MS",
                   help="run a measurement for at least MS ms, raising --number (default: cold 0, warm 100)")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="seconds each candidate's build, and its run, may take (default 60)")
    p.add_argument("--search-population", type=int, metavar="N",
                   help="candidates the evolutionary search evolves per batch (default 512; "
                        "smaller is quicker per batch, fine for small budgets)")
    _add_schedules_arg(p, "join MetaSchedule's design space (tile sizes left to the search) of the kernels "
                          "they fit, each measured first, so the best record is never slower than it")
    p.add_argument("--seed-schedules", dest="schedules", help=argparse.SUPPRESS)  # its former name
    p.add_argument("--cross-compiler", help="linker command for candidates (overrides the preset's)")
    _add_thread_args(p, "as the pool is; N is also the target's num-cores")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("bench", help="TVM alone, hand-scheduled and tuned (unfused/fused) vs PyTorch and ONNX Runtime")
    _add_model_args(p)
    p.add_argument("--target", default="host", help="target preset or TVM target JSON (default host)")
    p.add_argument("--tuning-records", help="records dir of the fused model (<dir>-unfused beside it) or a "
                                            "root like tuning_logs/ (default: the shipped records)")
    _add_force_records_arg(p)
    _add_thread_args(p, "every core here, for TVM, PyTorch and ONNX Runtime alike; a device's pool as it is")
    p.add_argument("--repeat", type=int, default=30, help="timed runs per variant (default 30)")
    p.add_argument("--rounds", type=int, default=5,
                   help="take each variant's runs in N rounds, the variants' order rotating, so a slow spell of "
                        "the machine hits all alike (default 5; 1: each variant's in a row)")
    _add_rpc_args(p, "run the TVM variants on the device there")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--plot", help="write a bar chart PNG here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("profile", help="time per compiled kernel (fused layer), with MACs and GFLOP/s")
    p.add_argument("model", help="a host .so from `tvmshuffle compile` (with its .so.json) or a model (compiled first)")
    p.add_argument("--input-shape", help="N,C,H,W when compiling a model")
    p.add_argument("--weights", help="state_dict for a zoo model")
    p.add_argument("--target", default="host", help="target preset or TVM target JSON (a device's with --rpc-…)")
    p.add_argument("--tuning-records", help="records dir to compile the model with")
    _add_force_records_arg(p)
    p.add_argument("--no-fuse", action="store_true", help="profile the unfused build")
    _add_schedules_arg(p)
    p.add_argument("--number", type=int, default=10, help="runs averaged per sample")
    p.add_argument("--repeat", type=int, default=5, help="samples (median taken)")
    p.add_argument("--in-model", action="store_true",
                   help="also what each group of kernels costs inside the whole model: the model rebuilt "
                        "with the group's kernels emptied, timed against the whole (one build per group)")
    _add_rpc_args(p, "profile a device library on the device there")
    _add_thread_args(p, "here TVM_NUM_THREADS or every core; a device's pool as it is")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("device", help="the emulated aarch64 device: a TVM RPC tracker + server under qemu")
    p.add_argument("action", choices=["up", "status", "down"])
    p.add_argument("--key", default=device.DEFAULT_KEY, help=f"device key (default {device.DEFAULT_KEY})")
    p.add_argument("--count", type=int, default=1, metavar="N",
                   help="up: N emulated servers under the key (a farm: tune measures on all at once; default 1)")
    p.add_argument("--tracker-port", type=int, default=device.DEFAULT_TRACKER_PORT,
                   help=f"tracker port (default {device.DEFAULT_TRACKER_PORT})")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; an RPC server runs any code it is sent)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_device)
    p = sub.add_parser("study", help="per-layer study of the fused shuffle_group_conv2d: default/hand/tuned "
                                     "GFLOP/s against the roofline")
    p.add_argument("--target", default="host", help="target preset or TVM target JSON (default host)")
    p.add_argument("--model", action="append", help="zoo model (repeatable; default: every ShuffleNet V1 and V2)")
    p.add_argument("--input-shape", help="N,C,H,W (default 1,3,224,224)")
    p.add_argument("--tuning-records", help="records dir, or a root like tuning_logs/ (default: "
                                            "tuning_logs/<target>/study, then the models' records there)")
    p.add_argument("--trials-per-layer", type=int, default=0,
                   help="tune each layer to N trials first (resumable; default 0: no tuning, missing ones said)")
    _add_rpc_args(p, "measure on the device there")
    _add_thread_args(p, "here TVM_NUM_THREADS, else every core; a device's pool as it is")
    p.add_argument("--number", type=int, default=20, help="runs averaged per sample (default 20)")
    p.add_argument("--repeat", type=int, default=15, help="samples, median taken (default 15)")
    p.add_argument("--limit", type=int, help="the first N distinct layers only")
    p.add_argument("-o", "--output-dir", help="where study.md, study.json, roofline.png go (default out/study/<target>)")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    p.set_defaults(func=cmd_study)
    return parser


def _device_timed_out(err: UserError) -> bool:
    from .remote import DeviceTimeout

    return isinstance(err, DeviceTimeout)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = "-v" in argv or "--verbose" in argv
    # TVM's thread pool takes half the cores on x86 (it assumes hyper-threads): 1 of 2 here.
    # Every core, unless the user says otherwise; read when the pool starts.
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    if not verbose:  # torch and TVM warn about their own deprecations; not the user's business
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
    )
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as err:
        if verbose:
            log.exception("error")
        print(f"tvmshuffle: error: {err}", file=sys.stderr)
        if _device_timed_out(err):
            # Objects of the dead session may still be referenced (by the traceback); TVM's
            # teardown of them at exit would wait for the device's answer for ever.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except BrokenPipeError:  # `tvmshuffle ... | head`
        return 0
    except KeyboardInterrupt:
        print("tvmshuffle: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

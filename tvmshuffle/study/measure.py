"""Building and timing each layer × schedule (default, hand, tuned), here or on an RPC device,
each checked against ``default`` before it is timed; :func:`run_study` puts the study together."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .. import devices, schedules, targets, tuning
from ..devices import open_device
from ..records import RECORD_FILE, TARGET_FILE, WORKLOAD_FILE, apply_records, default_root, records_dir_for
from .._shipped import display
from ..errors import UserError, last_line, quiet_logger
from ..remote import DeviceTimeout
from ..runtime import ThreadConfig, check
from ..tir_analysis import blocks, buffer_shape, is_scheduled

from .config import SCHEDULES, STUDY_RECORDS, StudyConfig, _bar, _preset
from .layers import Layer, fused_layers
from .hardware import Bandwidth, Peak, cpu_peak, measure_bandwidth, measure_peak
from .report import Row, StudyReport

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- where the code runs


def _open_device(config: StudyConfig, here_threads: int | None = None):
    """The device the layers run on (:func:`tvmshuffle.devices.open_device`; a session on a
    device ends after ``session_timeout`` s, so the study opens one a layer)."""
    return open_device(config.rpc_tracker, config.rpc_key, config.rpc_timeout,
                       ThreadConfig(config.threads, config.affinity), session_timeout=config.session_timeout,
                       here_threads=here_threads)


# --------------------------------------------------------------------------- schedules


def _build(func, preset: targets.TargetPreset):
    """A runtime module with the layer as its root function ``main``."""
    import tvm

    func = func.with_attr("global_symbol", "main")
    return tvm.tirx.build(tvm.IRModule({"main": func}), targets.tvm_target(preset))


def _hand(func, preset: targets.TargetPreset) -> tuple[object | None, str, str]:
    """(hand-scheduled func or None, note, status when None)."""
    try:
        scheduled = schedules.schedule_primfunc(func, preset, source="hand")
    except UserError as err:  # a schedule that fits but fails: this row's error, not the study's
        return None, str(err), f"error: {last_line(err)}"
    if scheduled is None:
        return None, "no hand schedule fits this layer", "missing"
    return scheduled, "", "missing"


def _gv(index: int) -> str:
    return f"layer{index:03d}"


def _layers_module(layers: list[Layer], indices=None):
    import tvm

    indices = range(len(layers)) if indices is None else indices
    return tvm.IRModule({_gv(i): layers[i].func for i in indices})


def _is_records_dir(path: Path) -> bool:
    return (path / WORKLOAD_FILE).is_file() or (path / TARGET_FILE).is_file()


def records_dirs(config: StudyConfig, preset: targets.TargetPreset) -> tuple[Path, list[Path]]:
    """(the study's records dir — tuning writes there, looked up first; other records dirs
    to look up layers still missing: the fused records of each model for the target)."""
    given = config.tuning_records
    if given is not None and _is_records_dir(given):
        return given, []
    root = given if given is not None else default_root()
    study = records_dir_for(preset, STUDY_RECORDS, root)
    others = []
    if study.parent.is_dir():
        others = sorted(d for d in study.parent.iterdir()
                        if d.is_dir() and d != study and not d.name.endswith("-unfused")
                        and (d / WORKLOAD_FILE).is_file() and (d / RECORD_FILE).is_file())
    return study, others


def tuned_funcs(layers: list[Layer], preset: targets.TargetPreset, study_dir: Path,
                others: list[Path]) -> tuple[dict[int, tuple[object, Path]], list[str]]:
    """Per layer index: (func with its best tuned schedule, records dir it came from), looked
    up in ``study_dir`` first, then in ``others``; and notes on dirs that could not be used."""
    found: dict[int, tuple[object, Path]] = {}
    notes: list[str] = []
    for records in [study_dir, *others]:
        missing = [i for i in range(len(layers)) if i not in found]
        if not missing:
            break
        if not ((records / WORKLOAD_FILE).is_file() and (records / RECORD_FILE).is_file()):
            continue
        try:
            applied, _ = apply_records(_layers_module(layers, missing), preset, records)
        except UserError as err:
            log.warning("%s", err)
            notes.append(str(err))
            continue
        for i in missing:
            func = applied[_gv(i)]
            if is_scheduled(func):
                found[i] = (func, records)
    return found, notes


def tune_layers(layers: list[Layer], preset: targets.TargetPreset, study_dir: Path, config: StudyConfig):
    """Give every layer ``trials_per_layer`` trials in ``study_dir`` (resumable: the trials
    already there count; layers that have them all are not tuned again)."""
    per_layer = config.trials_per_layer
    options = {"records_dir": study_dir, "rpc_tracker": config.rpc_tracker, "rpc_key": config.rpc_key,
               "progress": config.progress, "threads": config.threads, "affinity": config.affinity,
               **config.tune_options}
    todo = list(range(len(layers)))
    if (study_dir / WORKLOAD_FILE).is_file():  # count what is there (a zero budget tunes nothing)
        with quiet_logger(tuning.log):
            counted = tuning.tune(_layers_module(layers), preset, tuning.TuneConfig(trials=0, **options))
        counts = {t.name: t.trials for t in counted.tasks}
        if any(_gv(i) in counts for i in todo):
            todo = [i for i in todo if counts.get(_gv(i), 0) < per_layer]
        else:  # task names that are not ours: let tune count them against the whole budget
            log.debug("tuning tasks are named %s; tuning every layer", sorted(counts))
    if not todo:
        log.info("every layer has %d trials in %s: nothing to tune", per_layer, study_dir)
        return None
    log.info("tuning %d of %d layers, %d trials each, into %s", len(todo), len(layers), per_layer, study_dir)
    return tuning.tune(_layers_module(layers, todo), preset,
                       tuning.TuneConfig(trials=per_layer * len(todo), **options))


# --------------------------------------------------------------------------- measuring


def _random_args(layer: Layer, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    n_in = len(layer.inputs)
    dtypes = layer.dtypes or ["float32"] * (n_in + len(layer.outputs))
    inputs = [rng.standard_normal(s).astype(dtypes[i]) for i, s in enumerate(layer.inputs)]
    outputs = [np.zeros(s, dtypes[n_in + i]) for i, s in enumerate(layer.outputs)]
    return inputs, outputs




def _run(device, module, inputs, outputs) -> tuple[list, list[np.ndarray]]:
    args = [device.tensor(a) for a in inputs] + [device.tensor(o) for o in outputs]
    module["main"](*args)
    return args, [a.numpy() for a in args[len(inputs):]]


#: block annotation of a weight repacking stage (hand pointwise schedules, MetaSchedule's RewriteLayout)
LAYOUT_REWRITE = "meta_schedule.layout_rewrite_preproc"


def without_weight_packing(func):
    """``func`` without its weight repacking stages, taking the weights already packed (as a
    model build folds the packing into the constant weights, and as MetaSchedule measures);
    None if it has no such stage."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    if not any(LAYOUT_REWRITE in b.annotations for b in blocks(func)):
        return None
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)["main"]


def _measure_layer(layer: Layer, variants: dict[str, tuple[object | None, str, str]], device,
                   preset: targets.TargetPreset, config: StudyConfig, seed: int) -> list[Row]:
    """One row per schedule: built, checked against ``default``, then timed on ``device`` (an
    open one of :mod:`tvmshuffle.devices`).

    ``variants``: schedule → (func or None, note, status of the row when func is None). A
    schedule that repacks a weight is checked with the repacking and timed without it
    (:func:`without_weight_packing`), on random arguments of the packed shapes.
    """
    inputs, outputs = _random_args(layer, seed)
    rows = [Row(layer.layer, layer.kind, schedule, variants[schedule][2], ai=layer.ai, models=list(layer.models),
                calls=layer.calls, macs=layer.macs, bytes=layer.bytes, note=variants[schedule][1],
                emulated=device.emulated) for schedule in SCHEDULES]
    expected: list[np.ndarray] | None = None
    for row in rows:
        func = variants[row.schedule][0]
        if func is None:
            continue
        if row.schedule != "default" and expected is None:
            row.status = "error: default did not run, nothing to check against"
            continue
        try:
            module = device.load_built(_build(func, preset), preset, "layer")
            args, got = _run(device, module, inputs, outputs)
            kernel = without_weight_packing(func)
            if kernel is not None:
                rng = np.random.default_rng(seed)
                module = device.load_built(_build(kernel, preset), preset, "layer")
                args = [device.tensor(rng.standard_normal(buffer_shape(p)).astype(str(p.dtype))) for p in kernel.params]
                row.note = _join(row.note, "weight packing checked, not timed (a model build does it "
                                            "once, at compile time)")
        except DeviceTimeout:
            raise  # the device stopped answering: nothing more can be measured
        except Exception as err:  # noqa: BLE001 - a schedule that does not build or run: its row says so
            row.status = f"error: {last_line(err)}"
            log.warning("%s, %s: %s", layer.layer, row.schedule, row.status)
            continue
        if expected is None:
            expected = got  # default is the reference
            row.max_error = 0.0
        else:
            checks = [check(g, e, config.tolerance) for g, e in zip(got, expected)]
            row.max_error = max(err for _, err in checks)
            if not all(ok for ok, _ in checks):
                row.status = f"wrong: max error {row.max_error:.2e} > {config.tolerance:g} vs default"
                row.note = _join(row.note, "output differs from default: not timed")
                log.warning("%s, %s: %s", layer.layer, row.schedule, row.status)
                continue
        device.step(f"timing {layer.layer} ({row.schedule})")
        timer = module.time_evaluator("main", device.cpu(), number=config.number, repeat=config.repeat)
        row.ms = float(np.median(timer(*args).results)) * 1e3
        row.status = "ok"
        module = args = timer = None
    return rows


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _fill_rates(row: Row, peak: Peak, bandwidth: Bandwidth) -> None:
    if peak.gflops is not None and bandwidth.gbps is not None:
        row.roofline_gflops = min(peak.gflops, row.ai * bandwidth.gbps)
    elif bandwidth.gbps is not None:
        row.roofline_gflops = row.ai * bandwidth.gbps  # the bandwidth slope only
    if row.ms is None or row.ms <= 0:
        return
    row.gflops = 2 * row.macs / (row.ms * 1e6)
    if peak.gflops:
        row.peak_fraction = row.gflops / peak.gflops
    if row.roofline_gflops:
        row.roofline_fraction = row.gflops / row.roofline_gflops


def _peak(device, preset: targets.TargetPreset, config: StudyConfig, where: str) -> Peak:
    """The fp32 peak on ``device`` (not an emulated one): measured (:func:`measure_peak`) with
    the threads the layers run with, the formula of :func:`cpu_peak` beside it as a cross-check;
    the formula alone when the device's thread count is unknown (an RPC device without
    ``--threads`` or the preset's ``num-cores``)."""
    threads = device.threads or config.threads or preset.num_cores or (None if preset.is_cross else os.cpu_count())
    formula = cpu_peak(preset, threads)
    if threads is None:
        return formula
    measured = measure_peak(device, preset, threads, where)
    if measured.gflops is None:
        return formula
    if formula.gflops:
        measured.how += f"; the formula says {formula.how}"
    return measured


def run_study(config: StudyConfig, layers: list[Layer] | None = None) -> StudyReport:
    """Measure every layer (``layers``, else :func:`fused_layers` of ``config``) three ways."""
    preset = _preset(config, wait=True)  # fail before the slow part
    targets.export_function(preset)  # UserError now if the linker is missing
    if layers is None:
        layers = fused_layers(config)  # a model name that is wrong fails first
    if not layers:
        raise UserError("no fused shuffle_group_conv2d layer in the models studied")
    # this CPU: every core unless --threads (TVM's own default halves them on x86)
    here = config.threads or int(os.environ.get("TVM_NUM_THREADS") or 0) or os.cpu_count() or 1
    with _open_device(config, here) as device:
        threads = device.threads if device.is_here else None  # the report's: this CPU's pool
        where = devices.where(device, preset)
        if device.emulated:
            peak = Peak(None, f"{config.rpc_key} is an emulated device (qemu on this host): its speed says "
                                "nothing of an ARM core's, so no peak is given")
        else:
            peak = _peak(device, preset, config, where)
        bandwidth = measure_bandwidth(device, preset, config.bandwidth_mb, where)
        emulated = device.emulated
    study_dir, others = records_dirs(config, preset)
    if config.trials_per_layer > 0:
        tune_layers(layers, preset, study_dir, config)
    tuned, tuned_notes = tuned_funcs(layers, preset, study_dir, others)
    log.info("tuned schedules for %d of %d layers (%s%s)", len(tuned), len(layers), study_dir,
             f" and {len(others)} model records dirs" if others else "")
    log.debug("peak: %s", peak.how)
    log.debug("bandwidth: %s", bandwidth.how)
    rows: list[Row] = []
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        bar = _bar(list(enumerate(layers)), config, desc="measuring", unit="layer")
        for i, layer in bar:
            bar.set_postfix_str(layer.layer)
            hand = _hand(layer.func, preset)
            if i in tuned:
                func, source = tuned[i]
                tuned_variant = (func, f"records: {display(source)}", "missing")
            else:
                searched = ", ".join(display(d) for d in [study_dir, *others])
                tuned_variant = (None, f"no tuning records for this layer (looked in {searched}; "
                                       f"tvmshuffle study --trials-per-layer N tunes it)", "missing")
            variants = {"default": (layer.func, "as lowered", "missing"), "hand": hand, "tuned": tuned_variant}
            with _open_device(config, here) as device:  # a session a layer
                rows += _measure_layer(layer, variants, device, preset, config, config.seed + i)
                where = devices.where(device, preset)
        bar.close()
    for row in rows:
        _fill_rates(row, peak, bandwidth)
        if emulated and "EMULATED" not in row.note:
            row.note = _join("EMULATED", row.note)
    top = max((r.gflops for r in rows if r.gflops), default=0.0)
    if peak.gflops and top > peak.gflops:
        peak.how += (f". NOTE: {top:.1f} GFLOP/s was measured, above this peak: the cores ran faster than "
                     "that clock (boost clocks; under a hypervisor 'cpu MHz' shows the nominal one)")
        log.warning("a measured rate (%.1f GFLOP/s) exceeds the computed peak (%.1f)", top, peak.gflops)
    if tuned_notes:
        log.warning("tuning records not used: %s", "; ".join(tuned_notes))
    models = list(dict.fromkeys(m for l in layers for m in l.models))
    return StudyReport(rows=rows, peak=peak, bandwidth=bandwidth, where=where, target=preset.name,
                       input_shape=list(config.input_shape), number=config.number, repeat=config.repeat,
                       threads=threads, records_dir=display(study_dir), models=models,
                       emulated=emulated)



"""The study's results (:class:`Row`, :class:`StudyReport`) and their outputs: JSON, a markdown
table, the roofline plot."""

from __future__ import annotations

import logging
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import writable_output

from .hardware import Bandwidth, Peak

log = logging.getLogger(__name__)

@dataclass
class Row:
    """One layer × schedule."""

    layer: str
    kind: str
    schedule: str  # "default", "hand" or "tuned"
    status: str  # "ok", "missing", "wrong: …" or "error: …"
    ms: float | None = None  # median of one call
    gflops: float | None = None
    peak_fraction: float | None = None
    ai: float = 0.0  # flop/byte
    roofline_gflops: float | None = None
    roofline_fraction: float | None = None
    models: list[str] = field(default_factory=list)
    calls: int = 0
    macs: int = 0
    bytes: int = 0
    max_error: float | None = None  # vs default
    note: str = ""
    emulated: bool = False


@dataclass
class StudyReport:
    rows: list[Row]
    peak: Peak
    bandwidth: Bandwidth
    where: str  # "this CPU (AMD EPYC, znver4), 2 threads", "<key> (EMULATED …)"
    target: str
    input_shape: list[int]
    number: int
    repeat: int
    threads: int | None  # TVM threads here; None on a device
    records_dir: str  # the study's records dir
    models: list[str]
    emulated: bool = False

    def layer_names(self) -> list[str]:
        return list(dict.fromkeys(r.layer for r in self.rows))


# --------------------------------------------------------------------------- output


def to_json(report: StudyReport) -> dict:
    """The report as JSON-ready data: one ``layers`` entry per layer × schedule."""
    return {
        "target": report.target,
        "where": report.where,
        "emulated": report.emulated,
        "input_shape": report.input_shape,
        "number": report.number,
        "repeat": report.repeat,
        "threads": report.threads,
        "records_dir": report.records_dir,
        "models": report.models,
        "peak": asdict(report.peak),
        "bandwidth": asdict(report.bandwidth),
        "layers": [asdict(r) for r in report.rows],
    }


def _short_models(models: list[str]) -> str:
    if len(models) <= 2:
        return ", ".join(models)
    return f"{models[0]}, {models[1]} +{len(models) - 2}"


def _cell(row: Row | None) -> str:
    if row is None:
        return "–"
    if row.status == "ok":
        text = f"{row.gflops:.2f}"
        return text + (f" ({row.peak_fraction:.1%})" if row.peak_fraction is not None else "")
    if row.status == "missing":
        return "no hand schedule" if row.schedule == "hand" else "missing"
    return "**WRONG**" if row.status.startswith("wrong") else "error"


def markdown(report: StudyReport) -> str:
    """A table, one line per layer, preceded by the peak and bandwidth sentences."""
    peak = f"{report.peak.gflops:.1f} GFLOP/s" if report.peak.gflops is not None else "unknown"
    bandwidth = f"{report.bandwidth.gbps:.1f} GB/s" if report.bandwidth.gbps is not None else "unknown"
    lines = [
        f"**shuffle_group_conv2d study** on {report.where}, target {report.target}, input "
        f"{'x'.join(map(str, report.input_shape))}, {len(report.layer_names())} layers of "
        f"{len(report.models)} models; median of {report.repeat} samples × {report.number} runs",
        "",
        f"- Peak {peak}: {report.peak.how}",
        f"- Memory bandwidth {bandwidth}: {report.bandwidth.how}",
        "- GFLOP/s = 2 × MACs / time (% of peak in brackets); AI = flop / byte of minimum traffic; "
        "roofline = min(peak, AI × bandwidth)",
    ]
    if report.emulated:
        lines.append("- **EMULATED**: every time below is a qemu time on this host, not an ARM time")
    lines += [
        "",
        "| layer | kind | models | calls | MFLOP | AI | roofline GFLOP/s | default GFLOP/s | hand GFLOP/s | "
        "tuned GFLOP/s | best |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    notes: dict[str, list[str]] = {}
    for name in report.layer_names():
        rows = {r.schedule: r for r in report.rows if r.layer == name}
        first = next(iter(rows.values()))
        ok = [r for r in rows.values() if r.status == "ok"]
        best = max(ok, key=lambda r: r.gflops) if ok else None
        best_text = "–"
        if best is not None:
            base = rows.get("default")
            speedup = (f" ({best.gflops / base.gflops:.1f}× default)"
                       if base is not None and base.status == "ok" and best is not base else "")
            best_text = best.schedule + speedup
            if best.roofline_fraction is not None:
                best_text += f", {best.roofline_fraction:.0%} of roofline"
        roof = f"{first.roofline_gflops:.1f}" if first.roofline_gflops is not None else "–"
        lines.append(
            f"| {name} | {first.kind} | {_short_models(first.models)} | {first.calls} | "
            f"{2 * first.macs / 1e6:.2f} | {first.ai:.2f} | {roof} | {_cell(rows.get('default'))} | "
            f"{_cell(rows.get('hand'))} | {_cell(rows.get('tuned'))} | {'EMULATED ' if first.emulated else ''}"
            f"{best_text} |")
        for r in rows.values():
            if r.status != "ok":
                notes.setdefault(f"{r.schedule} {r.status}: {r.note}".strip(": "), []).append(name)
    if notes:
        lines += ["", "Not measured:"]
        for text, layers in notes.items():
            which = ", ".join(layers) if len(layers) <= 3 else f"{len(layers)} layers"
            lines.append(f"- {text} ({which})")
    return "\n".join(lines)


MARKERS = {"default": "o", "hand": "s", "tuned": "^"}
COLORS = {"pointwise": "#4c72b0", "depthwise": "#dd8452", "other": "#55a868"}


def plot(report: StudyReport, path: Path) -> Path:
    """Roofline PNG: log-log AI vs GFLOP/s, the peak roof and the bandwidth slope, one point
    per layer × schedule (marker per schedule, colour per kind)."""
    from matplotlib.lines import Line2D

    from ..figures import new_figure, save_figure

    rows = [r for r in report.rows if r.gflops]
    fig, ax = new_figure((8, 5.5))
    ais = [r.ai for r in report.rows if r.ai > 0] or [1.0]
    lo, hi = min(ais) / 2, max(ais) * 2
    peak, bw = report.peak.gflops, report.bandwidth.gbps
    if bw is not None:
        knee = peak / bw if peak else None
        lo, hi = min(lo, knee / 2 if knee else lo), max(hi, knee * 2 if knee else hi)
        xs = np.geomspace(lo, hi, 200)
        ys = np.minimum(xs * bw, peak) if peak else xs * bw
        ax.plot(xs, ys, color="black", linewidth=1.2,
                label=(f"roofline: {bw:.1f} GB/s, peak {peak:.0f} GFLOP/s" if peak
                       else f"bandwidth slope {bw:.1f} GB/s (no peak)"))
    elif peak:
        ax.axhline(peak, color="black", linewidth=1.2, label=f"peak {peak:.0f} GFLOP/s")
    for r in rows:
        ax.scatter(r.ai, r.gflops, marker=MARKERS.get(r.schedule, "x"), color=COLORS.get(r.kind, "gray"),
                   edgecolors="black", linewidths=0.4, s=36, zorder=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("arithmetic intensity, flop/byte (minimum traffic)")
    ax.set_ylabel("GFLOP/s")
    title = f"shuffle_group_conv2d layers, {report.target}, on {report.where}"
    if report.emulated and "EMULATED" not in title:
        title += " (EMULATED: qemu times)"
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    handles = [Line2D([], [], linestyle="", marker=m, color="gray", label=s) for s, m in MARKERS.items()]
    handles += [Line2D([], [], linestyle="", marker="o", color=c, label=k) for k, c in COLORS.items()
                if any(r.kind == k for r in report.rows)]
    roof_handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=roof_handles + handles, fontsize=8, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    return save_figure(fig, path)


def write_outputs(report: StudyReport, output_dir: Path) -> dict[str, Path]:
    """``study.md``, ``study.json`` and ``roofline.png`` in ``output_dir``."""
    import json

    output_dir = writable_output(output_dir, "-o", directory=True)
    md = output_dir / "study.md"
    md.write_text(markdown(report) + "\n")
    js = output_dir / "study.json"
    js.write_text(json.dumps(to_json(report), indent=1) + "\n")
    png = plot(report, output_dir / "roofline.png")
    return {"markdown": md, "json": js, "plot": png}


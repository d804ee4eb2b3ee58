"""Estimated network latency against tuning trials, from the records' curve.json files.

    python scripts/plot_curve.py tuning_logs/host-znver4/shufflenet_v1_g3_x1_0 ... -o docs/znver4/tuning_curve.png
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="+", help="records dirs (each with a curve.json)")
    parser.add_argument("-o", "--output", default="tuning_curve.png")
    args = parser.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4))
    for records in map(Path, args.records):
        curve = [p for p in json.loads((records / "curve.json").read_text()) if p["est_latency_ms"]]
        ax.plot([p["trials"] for p in curve], [p["est_latency_ms"] for p in curve], label=records.name)
    ax.set_xlabel("trials measured")
    ax.set_ylabel("estimated network latency, ms (sum of best kernels)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

"""The one way a report's figure is made and saved (``bench --plot``, the study's roofline):
matplotlib without a display, written as a PNG at 110 dpi, its directory created."""

from __future__ import annotations

from pathlib import Path

DPI = 110


def new_figure(figsize: tuple[float, float]):
    """``(figure, axes)`` of matplotlib's Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def save_figure(fig, path) -> Path:
    """Lay ``fig`` out, write it to ``path`` (its directory created) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path

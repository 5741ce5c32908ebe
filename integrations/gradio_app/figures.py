"""The app's pictures: the per-frame heat map as a matplotlib bar chart over the frames' timestamps."""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure


def heat_map(
    per_frame: Sequence[float], timestamps: Sequence[float], *, fast: Sequence[int] = (), unit: str = "frame"
) -> Figure:
    """One bar per frame (or temporal group: `unit`) at its time; those that feed the fast tokens (indices `fast`) are
    outlined.

    Built on `matplotlib.figure.Figure` (not pyplot), so figures are freed with the last reference.
    """
    figure = Figure(figsize=(8, 2.6), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    times = list(timestamps)
    width = 0.8 * min((b - a for a, b in zip(times, times[1:], strict=False)), default=1.0)
    peak = max(per_frame, default=0.0) or 1.0
    colours = [(0.85, 0.33, 0.1, 0.25 + 0.75 * max(v, 0.0) / peak) for v in per_frame]
    bars = axes.bar(times, per_frame, width=width, color=colours)
    fast_set = set(fast)
    for i, bar in enumerate(bars):
        if i in fast_set:
            bar.set_edgecolor("black")
            bar.set_linewidth(0.8)
    axes.set_xlabel(f"{unit} time (s); outlined: {unit}s pooled into the fast tokens")
    axes.set_ylabel("slow-token reading")
    axes.set_title(f"Where it looked: cross-attention x |gate| over the answer, per {unit}", fontsize=10)
    axes.margins(x=0.01)
    return figure

"""A sweep's figure: top-1 against the first swept value, mean +- std over seeds.

One line per combination of the other dimensions (one panel per value of the grid's panel
dimension); the baselines are dashed, horizontal where they do not vary with the x value.
"""
from __future__ import annotations

import io
import itertools

import numpy as np

from edgepopup_jax.planning.grid import Grid


def _x_positions(labels: list[str]) -> tuple[list[float], bool]:
    try:
        return [float(x) for x in labels], True
    except ValueError:
        return list(range(len(labels))), False


def _mean_std(rows: list[dict], where: dict) -> tuple[float, float] | None:
    accs = [r["top1"] for r in rows if r.get("status") == "ok"
            and all(r.get(k) == v for k, v in where.items())]
    return (float(np.mean(accs)), float(np.std(accs))) if accs else None


def plot(grid: Grid, rows: list[dict]) -> bytes:
    """The figure as PNG bytes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_dim = grid.dims[0]
    x_labels = [p.label for p in x_dim.points]
    xs, numeric = _x_positions(x_labels)
    panel_dim = next((d for d in grid.dims if d.label == grid.panel), None)
    panels = [p.label for p in panel_dim.points] if panel_dim else [None]
    line_dims = [d for d in grid.dims[1:] if d is not panel_dim]
    runs = [r for r in rows if not r["baseline"]]
    baselines = [r for r in rows if r["baseline"]]

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 1.5, 3.8), squeeze=False,
                             sharey=True)
    for ax, panel in zip(axes[0], panels):
        at_panel = {panel_dim.label: panel} if panel_dim else {}
        for combo in itertools.product(*([p.label for p in d.points] for d in line_dims)):
            where = {**at_panel, **{d.label: c for d, c in zip(line_dims, combo)}}
            points = [(x, _mean_std(runs, {**where, x_dim.label: label}))
                      for x, label in zip(xs, x_labels)]
            points = [(x, ms) for x, ms in points if ms is not None]
            if points:
                x, ms = zip(*points)
                mean, std = np.array(ms).T
                line, = ax.plot(x, mean, marker="o", label=", ".join(combo) or "edge-popup")
                ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        over = [d for d in line_dims if d.label in grid.baseline_over]
        for combo in itertools.product(*([p.label for p in d.points] for d in over)):
            where = {**at_panel, **{d.label: c for d, c in zip(over, combo)}}
            label = "dense, learned weights" + (f" ({', '.join(combo)})" if combo else "")
            if x_dim.label in grid.baseline_over:
                points = [(x, _mean_std(baselines, {**where, x_dim.label: xl}))
                          for x, xl in zip(xs, x_labels)]
                points = [(x, ms) for x, ms in points if ms is not None]
                if points:
                    x, ms = zip(*points)
                    ax.plot(x, np.array(ms)[:, 0], "k--", marker="x", label=label)
            elif (ms := _mean_std(baselines, where)) is not None:
                ax.axhline(ms[0], color="k", linestyle="--", label=label)
                ax.axhspan(ms[0] - ms[1], ms[0] + ms[1], color="k", alpha=0.08)
        if panel_dim:
            ax.set_title(f"{panel_dim.label} = {panel}")
        ax.set_xlabel(x_dim.label)
        if not numeric:
            ax.set_xticks(xs, x_labels)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 accuracy")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    if handles:
        axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110)
    plt.close(fig)
    return out.getvalue()

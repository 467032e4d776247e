"""Pictures of a comparison: forget quality against utility (one point per model) and metrics
against α (a sweep). matplotlib with the Agg backend, so they render without a display."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ..atomic import staged_file


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, force: bool) -> Path:
    """Render through a staged file (moxkit.atomic); an existing picture is replaced only
    with `force`."""
    with staged_file(path, force=force) as tmp:
        fig.savefig(tmp, dpi=130, bbox_inches="tight", format="png")
    return path


def _fq(value: float | None) -> float:
    """Forget quality on a log axis: p-values of exactly 0 drawn at the floor 1e-12."""
    return max(value, 1e-12) if value is not None else math.nan


def plot_methods(rows: Sequence[dict], path: str | Path, title: str, *, force: bool) -> Path:
    """Forget quality (log scale, higher = closer to the retain-only model) against model
    utility, one labelled point per row (keys: name, forget_quality, model_utility)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    points = [
        (r["name"], r.get("model_utility", math.nan), _fq(r.get("forget_quality"))) for r in rows
    ]
    for i, (_, x, y) in enumerate(points):
        ax.scatter([x], [y], s=70, color=f"C{i % 10}", zorder=3)
    ax.set_yscale("log")
    ax.margins(x=0.15, y=0.15)
    ax.autoscale_view()
    placed: list[tuple[float, float]] = []  # label anchors in pixels, to step around overlaps
    for name, x, y in points:
        px, py = ax.transData.transform((x, y))
        dy = 4.0
        while any(abs(px - qx) < 110 and abs(py + dy - qy) < 12 for qx, qy in placed):
            dy -= 13.0
        placed.append((px, py + dy))
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(7, dy), fontsize=10)
    ax.text(
        0.02,
        0.98,
        "better: up (forgotten) and right (kept)",
        transform=ax.transAxes,
        ha="left",
        va="top",
        fontsize=9,
        color="gray",
    )
    ax.set_xlabel("model utility (harmonic mean over retain + general sets) →")
    ax.set_ylabel("forget quality (KS p-value vs retain-only model) →")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    try:
        return _save(fig, Path(path), force)
    finally:
        plt.close(fig)


def plot_sweep(result, path: str | Path, metric: str, *, force: bool) -> Path:
    """Three panels against α (REF at α = 0): the rule's forget metric with the retain-only
    model's level, model utility, and forget quality; the picked α marked in each."""
    plt = _pyplot()
    rows = result.rows
    xs = list(range(len(rows)))
    labels = ["0 (ref)" if r["alpha"] == 0 else f"{r['alpha']:g}" for r in rows]
    panels = [
        (metric, f"{metric} ↓"),
        ("model_utility", "model utility ↑"),
        ("forget_quality", "forget quality ↑ (log)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, label) in zip(axes, panels, strict=True):
        ys = [r.get(key, math.nan) for r in rows]
        if key == "forget_quality":
            ys = [_fq(y) for y in ys]
            ax.set_yscale("log")
        ax.plot(xs, ys, marker="o")
        if key in result.retain_summary:
            ax.axhline(result.retain_summary[key], color="gray", ls="--", label="retain-only")
            ax.legend(loc="best", fontsize=9)
        if result.picked is not None:
            ax.axvline(xs[[r["alpha"] for r in rows].index(result.picked)], color="C3", ls=":")
        ax.set_xticks(xs, labels)
        ax.set_xlabel("α")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
    picked = "none qualifies" if result.picked is None else f"α = {result.picked:g}"
    fig.suptitle(f"α sweep: picked {picked} ({result.rule})", fontsize=10)
    fig.tight_layout()
    try:
        return _save(fig, Path(path), force)
    finally:
        plt.close(fig)

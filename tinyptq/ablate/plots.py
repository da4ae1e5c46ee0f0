"""Plots of an ablation report, drawn on matplotlib Figures (Agg canvas, no pyplot state).

Three kinds per report section (one use case and metric): metric vs bit-width
per component combination, the marginal-effect heatmap (toggle x bit setting)
and size / BOPs vs metric scatters with the Pareto front.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from tinyptq.ablate.report import GRANULARITY_TEXT, bit_setting

if TYPE_CHECKING:
    from tinyptq.ablate.report import Section

MARKERS = "osD^vPXh<>p*"
PREFIXES = ("bits_", "effects_", "pareto_")
# cost column -> (axis label, scale to the plotted unit)
COST_AXES = {"weight_bytes": ("weight size (KiB)", 1 / 1024),
             "bops": ("MBOPs (Σ MACs × weight bits × act bits / 10⁶)", 1e-6)}


def _style(i: int) -> dict:
    """Color, marker and line style of series ``i``: unique for 10 x 12 series."""
    return {"color": colormaps["tab10"](i % 10), "marker": MARKERS[i // 10 % len(MARKERS)],
            "ls": ("-", "--", "-.", ":")[i // 10 % 4]}


def _ylabel(sec: Section) -> str:
    return f"{sec.metric} ({sec.unit})" if sec.unit else sec.metric


def _legend_outside(ax, **kw) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False, **kw)


def metric_vs_bits(sec: Section, granularity: str) -> Figure:
    """Metric (mean ± std over seeds) vs bit setting, one line per component combination."""
    confs = [c for c in sec.configs if c["granularity"] == granularity]
    xs = sorted({(c["weight_bits"], c["act_bits"]) for c in confs})
    rows = list(dict.fromkeys(c["row"] for c in confs))
    # the legend sits right of the axes: a tall legend makes a tall figure
    fig = Figure(figsize=(11 + 0.9 * len(xs), max(4.2, 1.2 + 0.24 * len(rows))), layout="constrained")
    ax = fig.add_subplot()
    # dodge lines a little so identical results stay visible
    width = min(0.3, 0.04 * (len(rows) - 1))
    for i, row in enumerate(rows):
        pts = {(c["weight_bits"], c["act_bits"]): c for c in confs if c["row"] == row}
        y = [pts[x]["mean"] if x in pts and pts[x]["mean"] is not None else math.nan for x in xs]
        err = [(pts[x]["std"] or 0.0) if x in pts else 0.0 for x in xs]
        pos = np.arange(len(xs)) + (i / max(len(rows) - 1, 1) - 0.5) * width
        ax.errorbar(pos, y, yerr=err if any(err) else None, ms=5, lw=1.3, capsize=3, label=row,
                    **_style(i))
    if sec.fp32["value"] is not None:
        ax.axhline(sec.fp32["value"], ls="--", color="k", lw=1, label="FP32")
    ax.set_xticks(range(len(xs)), [f"W{w}A{a}" for w, a in xs])
    ax.set_xlabel("bit setting (weight bits, activation bits)")
    ax.set_ylabel(_ylabel(sec))
    ax.set_title(f"{sec.use_case}: {sec.metric} vs bit-width, "
                 f"{GRANULARITY_TEXT.get(granularity, granularity)}")
    ax.grid(alpha=0.3)
    _legend_outside(ax, title="components")
    return fig


def effect_heatmap(sec: Section) -> Figure:
    """Mean marginal effect per toggle value (rows) and bit setting (columns), with pair counts."""
    name = lambda e: f"{e['toggle']}: {e['value']} vs {e['baseline']}"  # noqa: E731
    rows = list(dict.fromkeys(name(e) for e in sec.effects))
    cols = [bit_setting(c) for c in sec.bit_settings()]
    mean = np.full((len(rows), len(cols)), np.nan)
    count = np.zeros((len(rows), len(cols)), dtype=int)
    for e in sec.effects:
        i, j = rows.index(name(e)), cols.index(bit_setting(e))
        count[i, j] = e["n"]
        if e["mean"] is not None:
            mean[i, j] = e["mean"]
    vmax = float(np.nanmax(np.abs(mean))) if np.isfinite(mean).any() else 1.0
    vmax = vmax or 1.0
    fig = Figure(figsize=(3.5 + 1.25 * len(cols), 1.8 + 0.55 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    cmap = colormaps["RdBu"].with_extremes(bad="#e0e0e0")
    im = ax.imshow(np.ma.masked_invalid(mean), cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if count[i, j] == 0:
                ax.text(j, i, "no pair", ha="center", va="center", fontsize=8, color="#555")
            else:
                dark = abs(mean[i, j]) > 0.6 * vmax
                ax.text(j, i, f"{mean[i, j]:+.2f}\nn={count[i, j]}", ha="center", va="center",
                        fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title(f"{sec.use_case}: marginal effect on {sec.metric}, all else equal")
    fig.colorbar(im, ax=ax, label=f"mean effect ({sec.unit or sec.metric})", shrink=0.9)
    return fig


def pareto_scatter(sec: Section) -> Figure | None:
    """Weight size and BOPs vs metric, colored by bit setting, Pareto front highlighted."""
    costs = [k for k in COST_AXES
             if any(c[k] is not None and c["mean"] is not None for c in sec.configs)]
    if not costs:
        return None
    settings = sec.bit_settings()
    pairs = list(dict.fromkeys((c["weight_bits"], c["act_bits"]) for c in settings))
    grans = sorted({c["granularity"] for c in settings}, key=str)
    fig = Figure(figsize=(2.5 + 4.8 * len(costs), 4.2), layout="constrained")
    axes = fig.subplots(1, len(costs), squeeze=False)[0]
    for ax, cost in zip(axes, costs, strict=True):
        label, scale = COST_AXES[cost]
        pts = [c for c in sec.configs if c[cost] is not None and c["mean"] is not None]
        # color = bit widths, marker = granularity
        for b in settings:
            sub = [c for c in pts if bit_setting(c) == bit_setting(b)]
            if sub:
                color = _style(pairs.index((b["weight_bits"], b["act_bits"])))["color"]
                marker = "os^D"[grans.index(b["granularity"]) % 4]
                ax.scatter([c[cost] * scale for c in sub], [c["mean"] for c in sub], s=28,
                           alpha=0.85, label=bit_setting(b), zorder=2, color=color, marker=marker)
        front = sorted((c for c in pts if c[f"front_{cost}"]), key=lambda c: c[cost])
        ax.plot([c[cost] * scale for c in front], [c["mean"] for c in front], "-o", ms=9,
                mfc="none", mec="k", color="k", lw=1, zorder=3, label="Pareto front")
        ref = sec.fp32.get(cost)
        if ref is not None and sec.fp32["value"] is not None:
            ax.scatter([ref * scale], [sec.fp32["value"]], marker="*", s=160, color="gold",
                       edgecolors="k", zorder=4, label="FP32")
        xs = [c[cost] for c in pts] + ([ref] if ref else [])
        if min(xs) > 0 and max(xs) / min(xs) > 8:
            _log_axis(ax)
        ax.set_xlabel(label + (", log scale" if ax.get_xscale() == "log" else ""))
        ax.set_ylabel(_ylabel(sec))
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{sec.use_case}: {sec.metric} vs cost", loc="left")
    _legend_outside(axes[-1], title="bit setting")
    return fig


def _log_axis(ax) -> None:
    """Log x axis with plain tick labels at 1, 2, 5 x 10^k (no crowded minor labels)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG through the Agg canvas."""
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def clear(plots_dir: Path) -> None:
    """Remove PNGs of an earlier report, so a re-run leaves no stale plots behind."""
    if plots_dir.is_dir():
        for p in plots_dir.glob("*.png"):
            if p.name.startswith(PREFIXES):
                p.unlink()


def write_plots(sec: Section, plots_dir: Path) -> list[tuple[str, Path]]:
    """Draw every plot of a section into ``plots_dir``: (caption, path) pairs."""
    out = []
    for gran in sorted({c["granularity"] for c in sec.configs}, key=str):
        text = GRANULARITY_TEXT.get(gran, str(gran))
        path = save(metric_vs_bits(sec, gran), plots_dir / f"bits_{sec.slug}_{text}.png")
        out.append((f"{sec.title}: metric vs bit-width, {text}", path))
    if any(e["n"] for e in sec.effects):
        path = save(effect_heatmap(sec), plots_dir / f"effects_{sec.slug}.png")
        out.append((f"{sec.title}: marginal effect of each component", path))
    fig = pareto_scatter(sec)
    if fig is not None:
        path = save(fig, plots_dir / f"pareto_{sec.slug}.png")
        out.append((f"{sec.title}: weight size and BOPs vs metric, Pareto front", path))
    return out

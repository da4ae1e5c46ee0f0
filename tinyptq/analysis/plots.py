"""Plots of an analysis (``tinyptq analyze``) as PNG bytes, drawn on matplotlib Figures.

Only ``Figure`` and the Agg canvas are used (no pyplot state), so drawing is
safe in any process and leaves nothing open. Every plot id in ``PLOT_IDS`` is
always returned; a plot without data shows "no data" instead.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PLOT_IDS = ("split", "units", "units_sqnr", "tensor_sqnr", "histograms", "stages", "fix")
DPI = 90
WIDTH, HEIGHT = 8.0, 3.5
MAX_LEVELS = 64  # grid levels drawn per histogram at most
# per-unit series: key in a unit -> legend text
SERIES = {"only_weights": "only its weights quantized",
          "only_acts": "only its activations quantized",
          "without_weights": "all quantized but its weights",
          "without_acts": "all quantized but its activations"}
MARKERS = {"only_weights": "o", "only_acts": "s", "without_weights": "^", "without_acts": "v"}


def _text(name: Any) -> str:
    """A name as plot text: '$' escaped so that matplotlib never parses it as math."""
    return str(name).replace("$", r"\$")


def _db_text(db: float | None) -> str:
    return "∞ dB" if db is None else f"{db:.1f} dB"


def _figure(height: float = HEIGHT, width: float = WIDTH) -> Figure:
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _width(n: int) -> float:
    """Figure width for ``n`` labelled x positions: 8 inches, wider for long lists."""
    return min(16.0, max(WIDTH, 2.0 + 0.2 * n))


def _png(fig: Figure) -> bytes:
    """The figure as PNG bytes; the figure is cleared afterwards."""
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=DPI)
    fig.clear()
    return buf.getvalue()


def _no_data(ax, title: str, why: str = "no data") -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def _names_axis(ax, names: Sequence[Any]) -> None:
    """Names as x tick labels, rotated; smaller type for long lists."""
    size = 8 if len(names) <= 16 else 6
    ax.set_xticks(range(len(names)), [_text(n) for n in names], rotation=45, ha="right",
                  rotation_mode="anchor", fontsize=size)
    ax.set_xlim(-0.6, len(names) - 0.4)


def _metric_label(analysis: dict) -> str:
    m = analysis["metric"]
    return f"{m['name']} ({m['unit']})" if m.get("unit") else str(m["name"])


def _split_row(analysis: dict, setting: str) -> dict | None:
    return next((r for r in analysis.get("split") or [] if r["setting"] == setting), None)


def split_figure(analysis: dict) -> Figure:
    """The four split settings: metric bars (left) and output SQNR bars (right)."""
    rows = analysis.get("split") or []
    fig = _figure()
    ax_m, ax_s = fig.subplots(1, 2)
    if not rows:
        _no_data(ax_m, "metric")
        _no_data(ax_s, "output SQNR")
        return fig
    x = range(len(rows))
    for i, r in zip(x, rows, strict=True):
        if r["metric"] is not None:
            ax_m.bar(i, r["metric"], color=f"C{i}")
            ax_m.text(i, r["metric"], f"{r['metric']:.2f}", ha="center", va="bottom", fontsize=8)
        db = r["sqnr_db"]
        ax_s.bar(i, 0.0 if db is None else db, color=f"C{i}")
        ax_s.text(i, 0.0 if db is None else db, _db_text(db), ha="center", va="bottom",
                  fontsize=8)
    for ax, title, label in ((ax_m, "metric", _metric_label(analysis)),
                             (ax_s, "output SQNR (none = no noise)", "SQNR (dB)")):
        ax.set_xticks(list(x), [r["setting"] for r in rows], rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(label)
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    return fig


def _units_figure(analysis: dict, key: str, ylabel: str, title: str) -> Figure:
    """One point per unit and series (``key`` of the series' dicts), FP32 and 'both' as lines."""
    units = analysis.get("units") or []
    fig = _figure(width=_width(len(units)))
    ax = fig.add_subplot()
    if not units:
        _no_data(ax, title)
        return fig
    for i, (series, label) in enumerate(SERIES.items()):
        # None (not applicable, or no noise) is not drawn: NaN leaves a gap in the line
        ys = [math.nan if u.get(series) is None or u[series][key] is None else u[series][key]
              for u in units]
        if not all(math.isnan(y) for y in ys):
            ax.plot(range(len(units)), ys, marker=MARKERS[series], ms=4, lw=0.8, color=f"C{i}",
                    label=label)
    for setting, style in (("fp32", "k--"), ("both", "r:")):
        row = _split_row(analysis, setting)
        if row is not None and row[key] is not None:
            ax.axhline(row[key], ls=style[1:], color=style[0], lw=1,
                       label="FP32" if setting == "fp32" else "all quantized")
    _names_axis(ax, [u["name"] for u in units])
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        fig.legend(loc="outside upper center", ncols=3, fontsize=7, frameon=False)
    return fig


def units_figure(analysis: dict) -> Figure:
    return _units_figure(analysis, "metric", _metric_label(analysis), "metric per unit")


def units_sqnr_figure(analysis: dict) -> Figure:
    return _units_figure(analysis, "sqnr_db", "output SQNR (dB)",
                         "output SQNR per unit (no noise not drawn)")


def _tensor_panel(ax, rows: list[dict], title: str, network: bool) -> None:
    """Local SQNR bars per tensor, the share clipped on a second axis."""
    if not rows:
        _no_data(ax, title)
        return
    ax.bar(range(len(rows)), [r["sqnr_db"] or 0.0 for r in rows], color="C0", label="local SQNR")
    for i, r in enumerate(rows):
        if r["sqnr_db"] is None:  # no noise
            ax.text(i, 0, "∞", ha="center", va="bottom", fontsize=9)
    if network:
        pts = [(i, r["sqnr_db_network"]) for i, r in enumerate(rows)
               if r.get("sqnr_db_network") is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, "o", mfc="none", color="k", ms=5, label="in the quantized network")
    _names_axis(ax, [r["name"] for r in rows])
    ax.set_ylabel("SQNR (dB)")
    ax.set_title(title, fontsize=9, loc="left")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=2, fontsize=7, frameon=False,
              borderaxespad=0.1)
    clip = [(i, 100 * r["clipped"]) for i, r in enumerate(rows) if r["clipped"] is not None]
    if clip:
        twin = ax.twinx()
        xs, ys = zip(*clip, strict=True)
        twin.plot(xs, ys, "x", color="C3", ms=6)
        twin.set_ylabel("clipped (%)", color="C3")
        twin.tick_params(axis="y", colors="C3")
        twin.set_ylim(bottom=0)


def tensor_sqnr_figure(analysis: dict) -> Figure:
    tensors = analysis.get("tensors") or {}
    acts, kernels = tensors.get("activations") or [], tensors.get("kernels") or []
    fig = _figure(height=2 * HEIGHT, width=_width(max(len(acts), len(kernels))))
    ax_a, ax_k = fig.subplots(2, 1)
    _tensor_panel(ax_a, acts, "activations: local SQNR, clipped share (x)", network=True)
    _tensor_panel(ax_k, kernels, "kernels: local SQNR, clipped share (x)", network=False)
    return fig


def _histogram_title(h: dict) -> str:
    channel = "" if h.get("channel") is None else f" ch {h['channel']}"
    return f"{_text(h['tensor'])}{channel}, {h['bits']} bits, {_db_text(h['sqnr_db'])}"


def _histogram(ax, h: dict) -> None:
    """One histogram: counts (log y), grid levels as thin lines, range limits thick dashed."""
    counts, edges = h["counts"], h["bin_edges"]
    if counts:
        ax.stairs(counts, edges, fill=True, color="C0", alpha=0.6)
        if any(c > 0 for c in counts):
            ax.set_yscale("log")
    grid = list(h.get("grid") or [])
    step = max(1, math.ceil(len(grid) / MAX_LEVELS))
    if grid:
        ax.vlines(grid[::step], 0, 1, transform=ax.get_xaxis_transform(), color="0.4", lw=0.4)
    for limit in h.get("range") or []:
        ax.axvline(limit, color="C3", lw=2, ls="--")
    ax.set_title(_histogram_title(h), fontsize=8)
    ax.tick_params(labelsize=7)


def histograms_figure(analysis: dict) -> Figure:
    entries = analysis.get("histograms") or []
    if not entries:
        fig = _figure(height=2.0)
        _no_data(fig.add_subplot(), "histograms")
        return fig
    cols = min(3, len(entries))
    rows = math.ceil(len(entries) / cols)
    fig = _figure(height=0.4 + 2.3 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, h in zip(axes, entries, strict=False):
        _histogram(ax, h)
    for ax in axes[len(entries):]:
        ax.set_axis_off()
    return fig


def stages_figure(analysis: dict) -> Figure:
    """Per-layer SQNR, one line per pipeline snapshot; the line style tells how it was quantized."""
    st = analysis.get("stages") or {}
    layers, columns = st.get("layers") or [], st.get("columns") or []
    fig = _figure(width=_width(len(layers)))
    ax = fig.add_subplot()
    if not layers or not columns:
        _no_data(ax, "SQNR per layer through the pipeline")
        return fig
    by = st.get("quantized_by") or [""] * len(columns)
    kinds = list(dict.fromkeys(by))
    for j, col in enumerate(columns):
        ys = [math.nan if lay["sqnr_db"][j] is None else lay["sqnr_db"][j] for lay in layers]
        ax.plot(range(len(layers)), ys, marker=".", lw=1, color=f"C{j % 10}",
                ls=("-", "--", ":", "-.")[kinds.index(by[j]) % 4],
                label=_text(f"{col} ({by[j]})" if by[j] else col))
    _names_axis(ax, [lay["layer"] for lay in layers])
    ax.set_ylabel("layer output SQNR (dB)")
    ax.set_title("SQNR per layer through the pipeline (no noise not drawn)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=7, frameon=False)
    return fig


def fix_figure(analysis: dict) -> Figure:
    """Recovered share vs units kept at higher bits, metric on a second axis."""
    fix = analysis.get("fix") or {}
    steps = fix.get("steps") or []
    fig = _figure()
    ax = fig.add_subplot()
    if not steps:
        _no_data(ax, "recovery", f"no fix: {fix.get('reason') or 'no steps'}")
        return fig
    xs = range(len(steps) + 1)
    ys = [0.0] + [math.nan if s["recovered"] is None else 100 * s["recovered"] for s in steps]
    ax.plot(xs, ys, "o-", color="C0", label="share recovered")
    if fix.get("share") is not None:
        ax.axhline(100 * fix["share"], color="C0", ls="--", lw=1, label="chosen share")
    if fix.get("selected"):
        ax.axvline(len(fix["selected"]), color="0.5", ls=":", lw=1, label="selected")
    ax.set_xticks(list(xs), ["baseline"] + [f"+{_text(s['unit'])}" for s in steps],
                  rotation=45, ha="right", rotation_mode="anchor", fontsize=7)
    ax.set_xlabel("units kept at higher bits (cumulative)")
    ax.set_ylabel(f"loss recovered (%, by {fix.get('select_by')})")
    ax.grid(alpha=0.3)
    _fix_metric_axis(ax, analysis, fix, steps)
    fig.legend(loc="outside upper center", ncols=4, fontsize=7, frameon=False)
    return fig


def _fix_metric_axis(ax, analysis: dict, fix: dict, steps: list[dict]) -> None:
    base = (fix.get("baseline") or {}).get("metric")
    metric = [base] + [s.get("metric") for s in steps]
    if all(m is None for m in metric):
        return
    twin = ax.twinx()
    twin.plot(range(len(metric)), [math.nan if m is None else m for m in metric], "s--",
              color="C2", ms=4, lw=1, label="metric")
    twin.set_ylabel(_metric_label(analysis), color="C2")
    twin.tick_params(axis="y", colors="C2")


BUILDERS: dict[str, Callable[[dict], Figure]] = {
    "split": split_figure, "units": units_figure, "units_sqnr": units_sqnr_figure,
    "tensor_sqnr": tensor_sqnr_figure, "histograms": histograms_figure,
    "stages": stages_figure, "fix": fix_figure}


def figures(analysis: dict) -> dict[str, bytes]:
    """Plot id -> PNG bytes, for every id in ``PLOT_IDS``."""
    return {pid: _png(BUILDERS[pid](analysis)) for pid in PLOT_IDS}

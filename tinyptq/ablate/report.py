"""The ablation report: ``results.csv``, ``report.md`` and a self-contained ``report.html``.

Pure helpers turn store rows into per-configuration summaries (mean and std
over seeds), marginal effects (paired runs that differ in one toggle only) and
Pareto fronts; one document model (a list of blocks) is rendered to Markdown
and to HTML, so both files always show the same tables.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean, stdev
from typing import Any

from tinyptq.ablate.render import render_html, render_markdown
from tinyptq.ablate.store import COLUMNS, JSON_COLUMNS, STATUSES, open_store

GRANULARITY_TEXT = {"per_tensor": "per-tensor", "per_channel": "per-channel"}
# fields two runs must share to form a pair (besides every other toggle)
PAIR_FIELDS = ("use_case", "metric", "weight_bits", "act_bits", "granularity", "calib_samples", "seed")
NO_PLOTS = "No completed runs: nothing to plot."


# ------------------------------------------------------------------ helpers
def number(x: Any) -> float | None:
    """``x`` as a finite float, else None (None, NaN, inf and text count as missing)."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def bit_setting(row: dict) -> str:
    """Short text of a run's bit setting, e.g. ``W8A8 per-channel``."""
    gran = GRANULARITY_TEXT.get(row.get("granularity"), str(row.get("granularity")))
    return f"W{row.get('weight_bits')}A{row.get('act_bits')} {gran}"


def bit_order(row: dict) -> tuple:
    """Sort key of bit settings: weight bits, then act bits, then granularity."""
    return (row.get("weight_bits") or 0, row.get("act_bits") or 0, str(row.get("granularity")))


def run_label(row: dict) -> str:
    """The run's component label (built from its toggles when the row has none)."""
    if row.get("label"):
        return str(row["label"])
    toggles = row.get("toggles") or {}
    return " ".join(f"{k}={v}" for k, v in toggles.items()) or "default"


def toggle_values(rows: Sequence[dict], grid_toggles: dict | None = None) -> dict[str, list[str]]:
    """Ordered values per toggle key: the grid's order, then values only seen in rows.

    Keys follow their order in the run labels (the grid's order: the stored JSON
    sorts keys), then the remaining keys alphabetically.
    """
    out = {str(k): [str(v) for v in vs] for k, vs in (grid_toggles or {}).items()}
    seen: dict[str, set[str]] = {}
    for r in rows:
        for k, v in (r.get("toggles") or {}).items():
            seen.setdefault(str(k), set()).add(str(v))
    for k, vs in seen.items():
        # "off" sorts before "on", so a stage's effect is on minus off
        out.setdefault(k, [])
        out[k] += sorted(vs - set(out[k]))
    in_labels = [t.split("=", 1)[0] for r in rows for t in str(r.get("label") or "").split()]
    order = list(dict.fromkeys(k for k in in_labels if k in out)) + sorted(out)
    return {k: out[k] for k in dict.fromkeys(order)}


def _combo_order(toggles: dict, values: dict[str, list[str]]) -> tuple:
    """Sort key of a component combination: the index of each toggle's value in the grid."""
    key = []
    for k, vs in values.items():
        v = str(toggles.get(k, ""))
        key.append(vs.index(v) if v in vs else len(vs))
    return tuple(key)


# ---------------------------------------------------------- pure analysis
def marginal_effects(rows: Sequence[dict], toggles: dict[str, list[str]]) -> list[dict]:
    """Mean effect of each toggle value vs the toggle's first value, all else equal.

    Runs pair when they agree on every field of PAIR_FIELDS and every other
    toggle. One entry per (use case, metric, bit setting, toggle, value): mean
    and std of the paired differences and their count ``n`` (0 = no pair: mean None).
    """
    done = [r for r in rows if r.get("status") == "done" and number(r.get("value")) is not None]
    out = []
    for key, values in toggles.items():
        if len(values) < 2:
            continue
        # context (all but this toggle) -> value of this toggle -> metric values
        by_ctx: dict[tuple, dict[str, list[float]]] = {}
        for r in done:
            t = r.get("toggles") or {}
            if key not in t:
                continue
            others = tuple(sorted((k, str(v)) for k, v in t.items() if k != key))
            ctx = tuple(r.get(f) for f in PAIR_FIELDS) + (others,)
            by_ctx.setdefault(ctx, {}).setdefault(str(t[key]), []).append(number(r["value"]))
        diffs: dict[tuple, list[float]] = {}
        for ctx, got in by_ctx.items():
            group = ctx[:5]  # use_case, metric, weight_bits, act_bits, granularity
            for v in values[1:]:
                found = diffs.setdefault(group + (v,), [])
                if v in got and values[0] in got:
                    found.append(fmean(got[v]) - fmean(got[values[0]]))
        for (uc, metric, wb, ab, gran, v), d in diffs.items():
            out.append({
                "use_case": uc, "metric": metric, "weight_bits": wb, "act_bits": ab,
                "granularity": gran, "toggle": key, "value": v, "baseline": values[0],
                "mean": fmean(d) if d else None, "std": stdev(d) if len(d) > 1 else None,
                "n": len(d),
            })
    order = {k: i for i, k in enumerate(toggles)}
    out.sort(key=lambda e: (str(e["use_case"]), str(e["metric"]), order[e["toggle"]],
                            toggles[e["toggle"]].index(e["value"]), bit_order(e)))
    return out


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, metric) points no other point beats: smaller cost, higher metric.

    A point is dominated when another has cost <= and metric >= with one strict
    (equal points are all kept); points with a missing or NaN coordinate never are.
    """
    ok = [i for i, p in enumerate(points) if number(p[0]) is not None and number(p[1]) is not None]
    # sweep by cost (ties: best metric first): a point is on the front when it beats
    # every cheaper point, or equals the point that set the best metric
    ok.sort(key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], None
    for i in ok:
        if best is None or points[i][1] > best[1] or tuple(points[i]) == best:
            front.append(i)
            best = tuple(points[i])
    return sorted(front)


def summarize(rows: Sequence[dict]) -> list[dict]:
    """One entry per configuration (everything but the seed) of the done runs: metric
    mean, std and count of finite values over seeds, plus size and BOPs."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status") == "done":
            key = (r.get("use_case"), r.get("metric"), run_label(r), r.get("calib_samples"),
                   r.get("weight_bits"), r.get("act_bits"), r.get("granularity"))
            groups.setdefault(key, []).append(r)
    out = []
    for (uc, metric, label, calib, wb, ab, gran), runs in groups.items():
        vals = [v for v in (number(r.get("value")) for r in runs) if v is not None]
        first = runs[0]
        out.append({
            "use_case": uc, "metric": metric, "metric_unit": first.get("metric_unit") or "",
            "label": label, "calib_samples": calib, "weight_bits": wb, "act_bits": ab,
            "granularity": gran, "toggles": first.get("toggles") or {},
            "mean": fmean(vals) if vals else None, "std": stdev(vals) if len(vals) > 1 else None,
            "n": len(vals), "runs": len(runs),
            "weight_bytes": number(first.get("weight_bytes")), "bops": number(first.get("bops")),
        })
    return out


@dataclass
class Section:
    """The results of one use case and metric: configurations, effects, FP32 reference."""

    use_case: str
    metric: str
    unit: str
    configs: list[dict]  # summarize() entries, each with a table "row" text
    effects: list[dict]  # marginal_effects() entries
    fp32: dict = field(default_factory=dict)  # value, weight_bytes, bops (None when unknown)
    seeds: int = 1

    @property
    def title(self) -> str:
        return f"{self.use_case} — {self.metric}" + (f" ({self.unit})" if self.unit else "")

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() or c in "-_" else "-" for c in f"{self.use_case}-{self.metric}")

    def bit_settings(self) -> list[dict]:
        """The section's bit settings (one representative config each), in bit order."""
        seen = {bit_setting(c): c for c in self.configs}
        return sorted(seen.values(), key=bit_order)


def _fp32(rows: list[dict], metric: str) -> dict:
    """FP32 reference of a section; the value only when it is the same metric."""
    vals = [number(r.get("fp32")) for r in rows if r.get("fp32_metric") in (None, metric)]
    vals = [v for v in vals if v is not None]
    first = rows[0] if rows else {}
    return {"value": fmean(vals) if vals else None,
            "weight_bytes": number(first.get("fp32_weight_bytes")),
            "bops": number(first.get("fp32_bops"))}


def build_sections(rows: Sequence[dict], toggles: dict[str, list[str]]) -> list[Section]:
    """Group done runs by use case and metric into report sections."""
    effects = marginal_effects(rows, toggles)
    sections = []
    for conf in summarize(rows):
        key = (conf["use_case"], conf["metric"])
        sec = next((s for s in sections if (s.use_case, s.metric) == key), None)
        if sec is None:
            sec = Section(conf["use_case"], conf["metric"], conf["metric_unit"], [],
                          [e for e in effects if (e["use_case"], e["metric"]) == key])
            sections.append(sec)
        sec.configs.append(conf)
    for sec in sections:
        runs = [r for r in rows if r.get("status") == "done"
                and (r.get("use_case"), r.get("metric")) == (sec.use_case, sec.metric)]
        sec.fp32 = _fp32(runs, sec.metric)
        sec.seeds = len({r.get("seed") for r in runs})
        calibs = {c["calib_samples"] for c in sec.configs}
        for c in sec.configs:
            c["row"] = c["label"] + (f" calib={c['calib_samples']}" if len(calibs) > 1 else "")
        sec.configs.sort(key=lambda c: (_combo_order(c["toggles"], toggles), c["label"],
                                        c["calib_samples"] or 0, bit_order(c)))
        for cost in ("weight_bytes", "bops"):
            front = set(pareto_front([(c[cost], c["mean"]) for c in sec.configs]))
            for i, c in enumerate(sec.configs):
                c[f"front_{cost}"] = i in front
    sections.sort(key=lambda s: (str(s.use_case), str(s.metric)))
    return sections


# ------------------------------------------------------------------ tables
@dataclass
class Table:
    """A table of text cells; ``bold`` holds (row, column) indices of emphasized cells."""

    header: list[str]
    body: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)


def _fmt(mean: float | None, std: float | None = None, signed: bool = False) -> str:
    if mean is None:
        return "n/a"
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return text + (f" ± {std:.2f}" if std is not None else "")


def results_table(sec: Section) -> Table:
    """Rows = component combination, columns = bit setting, cells = metric (mean ± std over seeds)."""
    cols = [bit_setting(c) for c in sec.bit_settings()]
    rows = list(dict.fromkeys(c["row"] for c in sec.configs))
    cells = {(c["row"], bit_setting(c)): c for c in sec.configs}
    body, best = [], {}
    for i, row in enumerate(rows):
        line = [row]
        for j, col in enumerate(cols, start=1):
            c = cells.get((row, col))
            if c is None:
                line.append("")
                continue
            text = _fmt(c["mean"], c["std"])
            if 0 < c["n"] < sec.seeds:
                text += f" (n={c['n']})"
            line.append(text)
            if c["mean"] is not None and c["mean"] > best.get(j, (-math.inf, 0))[0]:
                best[j] = (c["mean"], i)
        body.append(line)
    bold = {(i, j) for j, (_, i) in best.items()} if len(rows) > 1 else set()
    return Table(["components"] + cols, body, bold)


def effects_table(sec: Section) -> Table | None:
    """Rows = toggle value vs baseline, columns = bit setting, cells = mean effect (n pairs)."""
    if not sec.effects:
        return None
    cols = [bit_setting(c) for c in sec.bit_settings()]
    rows = list(dict.fromkeys(f"{e['toggle']}: {e['value']} vs {e['baseline']}" for e in sec.effects))
    cells = {(f"{e['toggle']}: {e['value']} vs {e['baseline']}", bit_setting(e)): e for e in sec.effects}
    body = []
    for row in rows:
        line = [row]
        for col in cols:
            e = cells.get((row, col))
            if e is None or e["n"] == 0:
                line.append("no pair")
            else:
                line.append(f"{_fmt(e['mean'], e['std'], signed=True)} (n={e['n']})")
        body.append(line)
    return Table(["effect"] + cols, body)


def pareto_table(sec: Section) -> Table | None:
    """The configurations on the Pareto front by weight size or by BOPs, smallest first."""
    front = [c for c in sec.configs if c["front_weight_bytes"] or c["front_bops"]]
    if not front:
        return None
    body = []
    for c in sorted(front, key=lambda c: (c["weight_bytes"] or 0, c["bops"] or 0)):
        by = [k for k, f in (("size", "front_weight_bytes"), ("BOPs", "front_bops")) if c[f]]
        body.append([c["row"], bit_setting(c),
                     "" if c["weight_bytes"] is None else f"{c['weight_bytes'] / 1024:.1f}",
                     "" if c["bops"] is None else f"{c['bops'] / 1e6:.1f}",
                     _fmt(c["mean"], c["std"]), ", ".join(by)])
    return Table(["components", "bits", "weights (KiB)", "MBOPs", sec.metric, "front by"], body)


def problems_table(rows: Sequence[dict]) -> Table | None:
    """Failed and skipped runs with their reasons (first line of the error)."""
    bad = [r for r in rows if r.get("status") in ("failed", "skipped")]
    if not bad:
        return None
    body = []
    for r in sorted(bad, key=lambda r: (r["status"], str(r.get("use_case")), bit_order(r))):
        reason = str(r.get("error") or "").strip().splitlines()
        reason = reason[0][:300] if reason else "(no reason given)"
        body.append([r["status"], str(r.get("use_case")), bit_setting(r), run_label(r),
                     str(r.get("calib_samples")), str(r.get("seed")), reason])
    return Table(["status", "use case", "bits", "components", "calib", "seed", "reason"], body)


def write_csv(rows: Sequence[dict], toggle_keys: Sequence[str], path: Path) -> Path:
    """All runs, one line each: the store's columns with one column per toggle key after ``label``."""
    tcols = {k: (f"toggle.{k}" if k in COLUMNS else k) for k in toggle_keys}
    cols = list(COLUMNS)
    at = cols.index("label") + 1
    cols[at:at] = list(tcols.values())
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            line = {c: ("" if r.get(c) is None else r[c]) for c in COLUMNS}
            for c in JSON_COLUMNS:
                if r.get(c) is not None and not isinstance(r[c], str):
                    line[c] = json.dumps(r[c], sort_keys=True)
            toggles = r.get("toggles") or {}
            line.update({col: toggles.get(k, "") for k, col in tcols.items()})
            w.writerow(line)
    return path


# ---------------------------------------------------------------- document
def _document(grid_name: str, rows: list[dict], sections: list[Section],
              plots: dict[str, list[tuple[str, Path]]]) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"h3"|"p", text), ("table", Table), ("img", caption, path)."""
    counts = {s: sum(r.get("status") == s for r in rows) for s in STATUSES}
    blocks: list[tuple] = [
        ("h1", f"Ablation report: {grid_name}"),
        ("p", f"{len(rows)} run{'' if len(rows) == 1 else 's'}: {counts['done']} done, {counts['failed']} failed, "
              f"{counts['skipped']} skipped."),
    ]
    if not sections:
        blocks.append(("p", NO_PLOTS))
    for sec in sections:
        table = results_table(sec)
        blocks += [("h2", sec.title),
                   ("p", f"FP32: {_fmt(sec.fp32['value'])}. Cells: {sec.metric} (higher is better)"
                         + (f", mean ± std over {sec.seeds} seeds" if sec.seeds > 1 else "")
                         + ("; bold = best per column" if table.bold else "") + "."),
                   ("table", table)]
        blocks.append(("h3", "Marginal effects"))
        table = effects_table(sec)
        if table is None:
            blocks.append(("p", "No toggles in this grid: no marginal effects."))
        else:
            blocks.append(("p", "Metric with the value minus the metric with the first listed "
                                "value, averaged over pairs of runs that differ only in that "
                                "toggle; n = number of pairs, 'no pair' = no such pair ran."))
            blocks.append(("table", table))
            if all(e["n"] == 0 for e in sec.effects):
                blocks.append(("p", "No pair of runs differs in one toggle only: "
                                    "no marginal effect can be computed."))
        table = pareto_table(sec)
        if table is not None:
            blocks += [("h3", "Pareto front (higher metric, smaller size or fewer BOPs)"),
                       ("table", table)]
        for caption, path in plots.get(sec.slug, []):
            blocks.append(("img", caption, path))
    blocks.append(("h2", "Failed and skipped runs"))
    table = problems_table(rows)
    blocks.append(("table", table) if table else ("p", "None."))
    return blocks


# ------------------------------------------------------------------- entry
def write_report(out_dir: str | Path) -> dict[str, Path]:
    """Write results.csv, report.md, report.html and plots/*.png into ``out_dir``.

    Returns their paths under keys "csv", "md", "html" and, when at least one
    plot was drawn, "plots" (the folder). Raises ConfigError when ``out_dir``
    holds no results store.
    """
    from tinyptq.ablate.plots import clear, write_plots  # matplotlib only when drawing

    out = Path(out_dir)
    store = open_store(out)
    rows = store.rows()
    grid = store.meta("grid") or {}
    grid_name = str(store.meta("grid_name") or grid.get("name") or out.name)
    toggles = toggle_values(rows, grid.get("toggles"))
    sections = build_sections(rows, toggles)

    paths = {"csv": write_csv(rows, list(toggles), out / "results.csv")}
    clear(out / "plots")
    plots = {sec.slug: write_plots(sec, out / "plots") for sec in sections}
    blocks = _document(grid_name, rows, sections, plots)
    paths["md"] = out / "report.md"
    paths["md"].write_text(render_markdown(blocks, out), encoding="utf-8")
    paths["html"] = out / "report.html"
    paths["html"].write_text(render_html(blocks, f"Ablation report: {grid_name}"), encoding="utf-8")
    if any(plots.values()):
        paths["plots"] = out / "plots"
    return paths

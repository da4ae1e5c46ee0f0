"""An analysis dict (``tinyptq analyze``) as analysis.md and a self-contained analysis.html.

Both documents come from one list of blocks, so they hold the same sections in
the same order: ``("h1" | "h2" | "h3" | "p", text)``, ``("table", Table)``,
``("code", language, text)``, ``("list", items)`` and ``("img", plot_id, alt)``.
Block text is plain; each renderer escapes it. The HTML embeds the plots of
``tinyptq.analysis.plots`` as base64 PNG and references nothing outside itself.
"""

from __future__ import annotations

import base64
import html as _html
import json
import re
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinyptq.analysis import plots
from tinyptq.paths import write_error

NA = "–"  # not applicable / not measured
FILE_NAMES = {"json": "analysis.json", "markdown": "analysis.md", "html": "analysis.html"}
PAIRS = {"only_weights": "only weights", "only_acts": "only activations",
         "without_weights": "all but weights", "without_acts": "all but activations"}


@dataclass
class Table:
    """Header and rows of text cells; the first ``left`` columns are text, the others numbers."""

    header: list[str]
    rows: list[list[str]]
    left: int = 1
    bold: set[tuple[int, int]] = field(default_factory=set)


@dataclass
class Fmt:
    """Number formats; ``inf`` writes an SQNR of None (no noise)."""

    unit: str
    inf: str

    def metric(self, v: float | None, signed: bool = False) -> str:
        unit = "%" if self.unit == "%" else f" {self.unit}" if self.unit else ""
        return NA if v is None else (f"{v:+.2f}" if signed else f"{v:.2f}") + unit

    def db(self, v: float | None, suffix: str = "") -> str:
        return self.inf + suffix if v is None else f"{v:.1f}{suffix}"

    def pct(self, v: float | None) -> str:
        return NA if v is None else f"{100 * v:.2f}%"

    def count(self, v: float | None, signed: bool = False) -> str:
        return NA if v is None else format(round(v), "+," if signed else ",")

    def span(self, r: list[float] | None) -> str:
        return NA if r is None else f"[{r[0]:.4g}, {r[1]:.4g}]"


def _split_metric(a: dict, setting: str, key: str = "metric") -> float | None:
    return next((r[key] for r in a.get("split") or [] if r["setting"] == setting), None)


def _loss(a: dict, metric: float | None) -> float | None:
    """FP32 metric minus ``metric`` (higher is better: positive = worse); None if not comparable."""
    fp32 = _split_metric(a, "fp32")
    if not a["metric"].get("comparable") or fp32 is None or metric is None:
        return None
    return fp32 - metric


def _unit_gain(a: dict, unit: dict) -> tuple[float, str] | None:
    """The better metric change vs 'both' when this unit's weights or activations stay float."""
    both = _split_metric(a, "both")
    gains = [(unit[k]["metric"] - both, what)
             for k, what in (("without_weights", "weights"), ("without_acts", "activations"))
             if both is not None and unit[k] and unit[k]["metric"] is not None]
    return max(gains) if gains else None


def _worst_unit(a: dict) -> tuple[dict, str, float] | None:
    """(unit, 'weights' or 'activations', gain) of the largest gain in float; first on ties."""
    scored = [(g[0], -i, g[1]) for i, u in enumerate(a.get("units") or [])
              if (g := _unit_gain(a, u)) is not None]
    if not scored:
        return None
    gain, i, what = max(scored)
    return a["units"][-i], what, gain


def _fix_sentence(a: dict, f: Fmt) -> str:
    fix = a["fix"] or {}
    selected = fix.get("selected") or []
    if not selected:
        return f"No fix is suggested: {fix.get('reason') or 'no unit was selected'}."
    bits = {"8": "8 bits", "next": "the next bit-width"}.get(str(fix["fix_bits"]), fix["fix_bits"])
    text = (f"Suggested fix: keep {len(selected)} unit{'s' * (len(selected) > 1)} at {bits} "
            f"({', '.join(map(str, selected))}), recovering {f.pct(fix['recovered'])} of the "
            f"loss (by {fix['select_by']})")
    b, c = ((fix.get("cost") or {}).get("weight_bytes") or [None, None])[:2]
    if b is not None and c is not None:
        text += f"; weight bytes {f.count(b)} → {f.count(c)} ({f.count(c - b, signed=True)})"
    text += f"; predicted {a['metric']['name']} {f.metric(fix['predicted_metric'])}"
    if applied := fix.get("applied"):
        text += (f"; applied (pipeline re-run with the overrides, {applied['seconds']:.0f} s): "
                 f"{f.metric(applied['metric_before'])} → {f.metric(applied['metric_after'])}")
    return text + ("." if applied else "; not applied (--apply re-runs the pipeline with it).")


def _headline(a: dict, f: Fmt) -> str:
    name, fp32, both = a["metric"]["name"], _split_metric(a, "fp32"), _split_metric(a, "both")
    loss = _loss(a, both)
    if loss is None:
        m = a["metric"]
        reference = (f"{m['fp32_name']} {m['fp32']:.4g} {m.get('fp32_unit', '')}".rstrip()
                     if m.get("fp32_name") and m.get("fp32") is not None else f"{f.metric(fp32)}")
        out = [f"Quantized, {name} {f.metric(both)}; FP32: {reference} (not comparable)."]
    else:
        out = [f"Quantized, {name} goes from {f.metric(fp32)} (FP32) to {f.metric(both)}: a "
               f"{'loss' if loss >= 0 else 'gain'} of {f.metric(abs(loss))} (weights only "
               f"{f.metric(_loss(a, _split_metric(a, 'weights only')))}, activations only "
               f"{f.metric(_loss(a, _split_metric(a, 'activations only')))})."]
    out.append(f"Output SQNR {f.db(_split_metric(a, 'both', 'sqnr_db'), ' dB')}.")
    worst = _worst_unit(a)
    if worst is not None:
        unit, what, gain = worst
        out.append(f"Worst unit: {unit['name']} ({unit['kind']}); keeping its {what} in float "
                   f"changes {name} by {f.metric(gain, signed=True)}.")
    return " ".join(out + [_fix_sentence(a, f)])


def _split_section(a: dict, f: Fmt) -> list[tuple]:
    loss = bool(a["metric"].get("comparable"))
    header = ["setting", a["metric"]["name"]] + ["loss"] * loss + ["output SQNR (dB)"]
    rows = [[r["setting"], f.metric(r["metric"])] + [f.metric(_loss(a, r["metric"]))] * loss
            + [f.db(r["sqnr_db"])] for r in a.get("split") or []]
    return [("h2", "1 Split of the loss"), ("table", Table(header, rows)),
            ("img", "split", "metric and output SQNR for the four split settings")]


def _unit_row(a: dict, f: Fmt, u: dict) -> list[str]:
    bits = " ".join(f"{p}{u[k]}" for p, k in (("W", "weight_bits"), ("A", "act_bits"))
                    if u[k] is not None)
    pairs = [NA if u[k] is None else f"{f.metric(u[k]['metric'])} / {f.db(u[k]['sqnr_db'])}"
             for k in PAIRS]
    gain = _unit_gain(a, u)
    return ([u["name"], u["kind"], bits or NA, ", ".join(u["act_points"] or []) or NA] + pairs
            + [NA if gain is None else f"{f.metric(gain[0], signed=True)} ({gain[1]})",
               f.count(u["weight_bytes"]), f.count(u["macs"])])


def _units_section(a: dict, f: Fmt) -> list[tuple]:
    units, worst = a.get("units") or [], _worst_unit(a)
    header = (["unit", "kind", "bits", "activation points"]
              + [f"{t} ({a['metric']['name']} / SQNR dB)" for t in PAIRS.values()]
              + ["gain in float", "weight bytes", "MACs"])
    table = Table(header, [_unit_row(a, f, u) for u in units], left=4)
    if worst is not None:
        i = next(i for i, u in enumerate(units) if u is worst[0])
        table.bold |= {(i, 0), (i, 8)}
    text = ("Each unit alone (only its weights or only its activations quantized, all else float) "
            "and everything quantized but the unit's weights or activations: metric / output "
            f"SQNR ({f.inf} = no noise). Gain in float: the better of the last two minus the "
            "metric with everything quantized; the largest is in bold.")
    return [("h2", "2 Per layer"), ("p", text), ("table", table),
            ("img", "units", "metric per unit"), ("img", "units_sqnr", "output SQNR per unit")]


def _bold_min(table: Table, col: int, values: list[float | None]) -> Table:
    present = [(v, i) for i, v in enumerate(values) if v is not None]
    if present:
        table.bold.add((min(present)[1], col))
    return table


def _tensors_section(a: dict, f: Fmt) -> list[tuple]:
    acts, kernels = a["tensors"]["activations"] or [], a["tensors"]["kernels"] or []
    common = ["range", "observed", "clipped", "SQNR (dB)"]

    def stats(r: dict) -> list[str]:
        return [f.span(r["range"]), f.span(r["observed"]), f.pct(r["clipped"]), f.db(r["sqnr_db"])]

    act_rows = [[r["name"], r["owner"] or NA, str(r["bits"])] + stats(r)
                + [f.db(r["sqnr_db_network"])] for r in acts]
    kernel_rows = [[r["name"], str(r["bits"]), "yes" if r["per_channel"] else "no"] + stats(r)
                   + [NA if r["worst_channel"] is None else str(r["worst_channel"])]
                   for r in kernels]
    names = ", ".join(h["tensor"] + ("" if h["channel"] is None else f" (channel {h['channel']})")
                      for h in a.get("histograms") or [])
    return [("h2", "3 Per tensor"),
            ("p", "Local statistics on the calibration samples; the worst SQNR is in bold."),
            ("h3", "Activations"),
            ("table", _bold_min(Table(["tensor", "owner", "bits"] + common + ["in network (dB)"],
                                      act_rows, left=2), 6, [r["sqnr_db"] for r in acts])),
            ("h3", "Kernels"),
            ("table", _bold_min(Table(["kernel", "bits", "per channel"] + common
                                      + ["worst channel"], kernel_rows, left=3),
                                6, [r["sqnr_db"] for r in kernels])),
            ("img", "tensor_sqnr", "local SQNR and clipped share per tensor"),
            ("h3", "Histograms"), ("p", f"The worst tensors: {names or NA}. Thin lines: the "
                                       "representable values; dashed: the range limits."),
            ("img", "histograms", "histograms of the worst tensors")]


def _stages_section(a: dict, f: Fmt) -> list[tuple]:
    st = a["stages"] or {}
    cols, groups = st.get("columns") or [], {}
    for c, b in zip(cols, st.get("quantized_by") or [], strict=False):
        groups.setdefault(b, []).append(c)
    rows = [[lay["layer"]] + [f.db(v) + "*" * bool(ch)
                              for v, ch in zip(lay["sqnr_db"], lay["changed"], strict=False)]
            for lay in st.get("layers") or []]
    how = "".join(f" Quantized by {b}: {', '.join(cs)}." for b, cs in groups.items())
    text = (f"Per-layer output SQNR (dB) after each stage; * = the stage changed the layer, "
            f"{f.inf} = no error or layer absent.{how}")
    return [("h2", "4 Through the pipeline"), ("p", text), ("table", Table(["layer"] + cols, rows)),
            ("img", "stages", "per-layer SQNR through the pipeline")]


def _fix_section(a: dict, f: Fmt) -> list[tuple]:
    fix, name = a["fix"] or {}, a["metric"]["name"]
    out: list[tuple] = [("h2", "5 Suggested fix"), ("p", _fix_sentence(a, f))]
    by_noise = fix.get("select_by", "noise") == "noise"
    loss = f.pct if by_noise else f.metric  # noise-to-signal ratio, or metric points lost
    what = "noise" if by_noise else f"{name} loss"
    if fix.get("selected"):
        base = fix.get("baseline") or {}
        measure = ("output noise-to-signal ratio " + f.pct(base.get("loss")) + " on calibration data, "
                   if by_noise else "")
        out.append(("p", f"Everything quantized: {measure}{name} "
                         f"{f.metric(base.get('metric'))} on the evaluation set. Units are added "
                         f"by {fix['select_by']} until {f.pct(fix['share'])} of the loss is "
                         "recovered."))
    if fix.get("ranking"):
        rows = [[str(i), r["unit"], loss(r["loss"]), loss(r["gain"])]
                for i, r in enumerate(fix["ranking"], 1)]
        out += [("h3", "Ranking (each unit raised alone)"),
                ("table", Table(["rank", "unit", f"{what} after", f"{what} removed"], rows, left=2))]
    if fix.get("steps"):
        rows = [[str(i), s["unit"], loss(s["loss"]), f.pct(s["recovered"]),
                 f.metric(s["metric"])] for i, s in enumerate(fix["steps"], 1)]
        out += [("h3", "Steps (units kept at higher bits, cumulative)"),
                ("table", Table(["units kept", "unit added", what, "recovered", name], rows,
                                left=2))]
    out.append(("img", "fix", "share of the loss recovered vs units kept at higher bits"))
    if not fix.get("selected"):
        return out
    rows = [[k.replace("_", " "), f.count(v[0]), f.count(v[1]),
             NA if None in v else f.count(v[1] - v[0], signed=True)]
            for k, v in (fix.get("cost") or {}).items() if v]
    return out + [("h3", "Overrides"), ("p", "Paste into the pipeline file:"),
                  ("code", "yaml", fix.get("yaml") or ""), ("h3", "Cost"),
                  ("table", Table(["cost", "before", "after", "change"], rows))]


def document(a: dict, inf: str) -> list[tuple]:
    """The blocks of the whole report; ``inf`` writes an SQNR of None."""
    f = Fmt(a["metric"].get("unit") or "", inf)
    bits = a["bits"]
    title = (f"tinyptq analysis: {a['use_case']}, W{bits['weights']}A{bits['activations']}, "
             f"{a['pipeline']}")
    times = ", ".join(f"{k} {v:.1f} s" for k, v in (a["seconds"] or {}).items() if v is not None)
    run = (f"Model {a['model']}, target {a['target']}, tinyptq {a['tinyptq_version']}; "
           f"{a['eval_samples']} evaluation and {a['calib_samples']} calibration samples. "
           f"Time: {times or NA}.")
    notes = [("h2", "Notes"), ("list", a["notes"]) if a.get("notes") else ("p", "None.")]
    return ([("h1", title), ("p", run), ("p", _headline(a, f))] + _split_section(a, f)
            + _units_section(a, f) + _tensors_section(a, f) + _stages_section(a, f)
            + _fix_section(a, f) + notes)


# escaped: markup characters, '(' after ']' (a link) and '_' at a word's edge (emphasis);
# kept: '_' inside a word and brackets, so that names and ranges stay readable
_MD_SPECIAL = re.compile(r"[\\`*<>|&#]|(?<=\])\(|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def _md(text: Any) -> str:
    """Plain text for Markdown, markup characters backslash-escaped."""
    return _MD_SPECIAL.sub(lambda m: "\\" + m.group(0), str(text))


def _md_table(t: Table) -> str:
    if not t.rows:
        return "*(none)*"
    align = ["---" if j < t.left else "---:" for j in range(len(t.header))]
    lines = [[_md(h) for h in t.header], align] + [
        [f"**{_md(c)}**" if (i, j) in t.bold and c else _md(c) for j, c in enumerate(r)]
        for i, r in enumerate(t.rows)]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _md_block(kind: str, *args: Any) -> str:
    if kind in ("h1", "h2", "h3"):
        return "#" * int(kind[1]) + " " + _md(args[0])
    if kind == "table":
        return _md_table(args[0])
    if kind == "code":  # a fence longer than any run of backticks inside
        fence = "`" * max(3, 1 + max(map(len, re.findall(r"`+", args[1])), default=0))
        return f"{fence}{args[0]}\n{args[1].rstrip(chr(10))}\n{fence}"
    if kind == "list":
        return "\n".join("- " + _md(item) for item in args[0])
    if kind == "img":
        return f"*Plot {args[0]}: {_md(args[1])} (in analysis.html).*"
    return _md(args[0])


def markdown(analysis: dict) -> str:
    """The whole analysis.md text; plots are only named (they are embedded in analysis.html)."""
    return "\n\n".join(_md_block(*b) for b in document(analysis, "inf")) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}
table{border-collapse:collapse;margin:0.8em 0;font-size:13px}th{background:#f0f0f0}
th,td{border:1px solid #bbb;padding:3px 7px;text-align:left;vertical-align:top}
.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}.wide{overflow-x:auto}
pre{background:#f6f6f6;border:1px solid #ddd;padding:0.6em;overflow-x:auto}img{max-width:100%}"""


def _html_table(t: Table) -> str:
    def cell(tag: str, i: int, j: int, text: str) -> str:
        body, cls = _html.escape(text), ' class="n"' if j >= t.left else ""
        body = f"<strong>{body}</strong>" if (i, j) in t.bold and text else body
        return f"<{tag}{cls}>{body}</{tag}>"

    if not t.rows:
        return "<p><em>(none)</em></p>"
    rows = [("th", -1, t.header)] + [("td", i, r) for i, r in enumerate(t.rows)]
    body = "\n".join("<tr>" + "".join(cell(tag, i, j, c) for j, c in enumerate(cells)) + "</tr>"
                     for tag, i, cells in rows)
    return f'<div class="wide"><table>\n{body}\n</table></div>'


def _html_block(pngs: dict[str, bytes], kind: str, *args: Any) -> str:
    esc = _html.escape
    if kind == "table":
        return _html_table(args[0])
    if kind == "code":
        return f'<pre><code class="language-{esc(args[0])}">{esc(args[1])}</code></pre>'
    if kind == "list":
        return "<ul>" + "".join(f"<li>{esc(item)}</li>" for item in args[0]) + "</ul>"
    if kind == "img":
        data = base64.b64encode(pngs[args[0]]).decode("ascii")
        return (f'<figure><img id="plot-{esc(args[0])}" alt="{esc(args[1])}" '
                f'src="data:image/png;base64,{data}"><figcaption>{esc(args[1])}</figcaption>'
                "</figure>")
    return f"<{kind}>{esc(args[0])}</{kind}>"


def html(analysis: dict) -> str:
    """The whole analysis.html text: inline CSS, every plot a base64 PNG, no external reference."""
    blocks, pngs = document(analysis, "∞"), plots.figures(analysis)
    head = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f"<title>{_html.escape(blocks[0][1])}</title>\n<style>{_CSS}</style></head><body>")
    body = "\n".join(_html_block(pngs, *b) for b in blocks)
    return f"{head}\n{body}\n</body></html>\n"


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a .tmp file; ConfigError in one line on OSError."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from None


def write_reports(analysis: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write analysis.json, analysis.md and analysis.html into ``out_dir``; their paths by kind.

    The JSON goes first, so that a rendering failure still leaves the computed result on disk.
    """
    paths = {kind: Path(out_dir) / name for kind, name in FILE_NAMES.items()}
    _write_text(paths["json"], json.dumps(analysis, indent=2, allow_nan=False) + "\n")
    _write_text(paths["markdown"], markdown(analysis))
    _write_text(paths["html"], html(analysis))
    return paths

"""The tables and the plot of ``benchmarks/peers.py``: peers.json, peers.md, peers.png."""

from __future__ import annotations

import json
from pathlib import Path

TOOL_ORDER = ("tinyptq", "onnxruntime", "tflite", "aimet", "mct")
SETTING_ORDER = ("W8A8", "W4A8", "W3A8", "W4A4", "mixed")
COLORS = {"tinyptq": "k", "onnxruntime": "tab:blue", "tflite": "tab:orange", "aimet": "tab:green", "mct": "tab:red"}
TOOL_NAMES = {
    "tinyptq": "tinyptq",
    "onnxruntime": "onnxruntime quantize_static",
    "tflite": "TFLite converter",
    "aimet": "AIMET-ONNX",
    "mct": "Sony MCT",
}


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "ok"]


def headline(rows: list[dict]) -> list[dict]:
    """Per use case and setting: tinyptq's best, the best peer, and the time against the closest peer."""
    lines = []
    for uc in dict.fromkeys(r["use_case"] for r in rows):
        for setting in SETTING_ORDER:
            here = _ok([r for r in rows if r["use_case"] == uc and r["setting"] == setting])
            ours = [r for r in here if r["tool"] == "tinyptq"]
            peers = [r for r in here if r["tool"] != "tinyptq"]
            if not ours or not peers:
                continue
            best = max(ours, key=lambda r: (r["value"], -r["quantize_seconds"]))
            peer = max(peers, key=lambda r: (r["value"], -r["quantize_seconds"]))
            closest = min(peers, key=lambda r: (abs(r["value"] - best["value"]), r["quantize_seconds"]))
            lines.append(
                {
                    "use_case": uc,
                    "setting": setting,
                    "tinyptq": f"{best['method']}",
                    "tinyptq_value": best["value"],
                    "tinyptq_seconds": best["quantize_seconds"],
                    "peer": f"{peer['tool']} {peer['method']}",
                    "peer_value": peer["value"],
                    "difference": best["value"] - peer["value"],
                    "closest": f"{closest['tool']} {closest['method']}",
                    "closest_value": closest["value"],
                    "closest_seconds": closest["quantize_seconds"],
                    "time_ratio": best["quantize_seconds"] / max(closest["quantize_seconds"], 1e-3),
                }
            )
    return lines


def _parts(stamp: dict) -> list[str]:
    """How long each invocation of peers.py took (a rerun adds only the runs missing or failed before)."""
    parts = stamp.get("parts") or []
    if not parts:
        return []
    lines = ["The runs, as they were made (wall time of each invocation, load average at its start and end):", ""]
    for p in sorted(parts, key=lambda p: p["date"]):
        tools = ", ".join(TOOL_NAMES.get(t, t) for t in p["tools"])
        lines.append(
            f"- {p['date']}: {p['runs']} runs of {tools} in {p['run_seconds'] / 60:.1f} min "
            f"(load {p['load_average'][0]} → {p['load_average'][1]})"
        )
    return [*lines, ""]


def _cell(row: dict | None) -> str:
    if row is None:
        return ""
    if row["status"] == "ok":
        mb = row.get("peak_rss_mb")
        return f"{row['value']:.2f} ({row['quantize_seconds']:.0f} s, {mb:.0f} MB)" if mb else f"{row['value']:.2f} ({row['quantize_seconds']:.0f} s)"
    return {"unsupported": "n/a", "not installed": "not installed"}.get(row["status"], row["status"])


def markdown(rows: list[dict], stamp: dict) -> str:
    """The headline table, then a table per use case (a row per tool and method, a column per setting)."""
    versions = ", ".join(f"{TOOL_NAMES[t]} {v}" for t, v in stamp["versions"].items())
    out = [
        f"Run on {stamp['cores']} cores ({stamp.get('jobs', 1)} runs at a time, each pinned to one core), "
        f"Python {stamp['python']}; {versions}. Every tool got the same float model, the same "
        f"{stamp['calib_samples']} calibration samples (seed {stamp['seed']}) and the same evaluation inputs.",
        "",
        *_parts(stamp),
        "**Headline**: tinyptq's best against the best peer at each setting, and tinyptq's PTQ time "
        "relative to the peer whose accuracy is closest to tinyptq's best.",
        "",
        "| use case | setting | tinyptq best | best peer | tinyptq − peer | closest peer | time vs closest |",
        "|---|---|---|---|---|---|---|",
    ]
    for h in headline(rows):
        out.append(
            f"| {h['use_case']} | {h['setting']} | {h['tinyptq_value']:.2f} ({h['tinyptq']}) | "
            f"{h['peer_value']:.2f} ({h['peer']}) | **{h['difference']:+.2f}** | "
            f"{h['closest_value']:.2f} ({h['closest']}) | {h['time_ratio']:.2f}× "
            f"({h['tinyptq_seconds']:.0f} s vs {h['closest_seconds']:.0f} s) |"
        )
    out.append("")
    for uc, meta in stamp["use_cases"].items():
        mine = [r for r in rows if r["use_case"] == uc]
        if not mine:
            continue
        settings = [s for s in SETTING_ORDER if any(r["setting"] == s for r in mine)]
        out += [
            f"### {uc}: FP32 {meta['fp32']:.2f} ({meta['metric']}, {meta['eval_samples']} samples of "
            f"{meta['eval_source']})",
            "",
            "| tool | method | " + " | ".join(settings) + " |",
            "|---|---|" + "---|" * len(settings),
        ]
        keys = dict.fromkeys((r["tool"], r["method"]) for r in sorted(mine, key=_order))
        for tool, method in keys:
            by_setting = {r["setting"]: r for r in mine if r["tool"] == tool and r["method"] == method}
            best = {s: max((r["value"] for r in _ok(mine) if r["setting"] == s), default=None) for s in settings}
            cells = []
            for s in settings:
                cell, row = _cell(by_setting.get(s)), by_setting.get(s)
                if row and row["status"] == "ok" and row["value"] == best[s]:
                    cell = f"**{cell}**"
                cells.append(cell)
            out.append(f"| {TOOL_NAMES[tool]} | {method} | " + " | ".join(cells) + " |")
        out.append("")
        reasons = {}
        for r in mine:
            if r["status"] != "ok":
                reasons.setdefault(f"{TOOL_NAMES[r['tool']]} {r['method']}: {r.get('reason', r['status'])}", []).append(
                    r["setting"]
                )
        out += [f"- {text} ({', '.join(s)})" for text, s in reasons.items()]
        out.append("")
    out += ["**Time per tool** (sum of its runs' wall times, each on one core, process start and evaluation "
            "included):", ""]
    out += ["| tool | runs | unsupported | failed | wall time |", "|---|---|---|---|---|"]
    for tool in TOOL_ORDER:
        mine = [r for r in rows if r["tool"] == tool]
        if mine:
            wall = sum(r.get("wall_seconds", 0.0) for r in mine)
            count = {k: sum(r["status"] == k for r in mine) for k in ("ok", "unsupported")}
            failed = len(mine) - count["ok"] - count["unsupported"]
            out.append(f"| {TOOL_NAMES[tool]} | {count['ok']} | {count['unsupported']} | {failed} | {wall / 60:.1f} min |")
    out.append("")
    out.append(
        "Cells: metric (the tool's PTQ time on these cores, peak resident memory of its process). "
        "Best of a column in bold. Every layer and the model input at the setting's bits; "
        "*mixed*: weight bits per layer (2, 4 or 8) within the weight memory of the tool's own uniform W4 "
        "model, activations at 8 bits."
    )
    return "\n".join(out) + "\n"


def _order(row: dict) -> tuple:
    return (TOOL_ORDER.index(row["tool"]) if row["tool"] in TOOL_ORDER else 99, row["method"])


def plot(rows: list[dict], stamp: dict, path: Path) -> None:
    """Best metric per tool against the bit setting, a panel per use case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [uc for uc in stamp["use_cases"] if any(r["use_case"] == uc for r in _ok(rows))]
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.8), squeeze=False)
    uniform = [s for s in SETTING_ORDER if s != "mixed"]
    for ax, uc in zip(axes[0], names, strict=True):
        mine = _ok([r for r in rows if r["use_case"] == uc])
        for tool in TOOL_ORDER:
            pts = []
            for i, s in enumerate(uniform):
                values = [r["value"] for r in mine if r["tool"] == tool and r["setting"] == s]
                if values:
                    pts.append((i, max(values)))
            if pts:
                style = {"lw": 2.5 if tool == "tinyptq" else 1.2, "color": COLORS[tool]}
                ax.plot(*zip(*pts, strict=True), marker="o", label=TOOL_NAMES[tool], **style)
        meta = stamp["use_cases"][uc]
        ax.axhline(meta["fp32"], color="grey", ls="--", lw=0.8, label="FP32")
        ax.set_xticks(range(len(uniform)), uniform)
        ax.set(title=f"{uc}: best per tool", ylabel=meta["metric"] + " (%)", xlabel="bits (every layer and the input)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def readme_block(rows: list[dict], stamp: dict) -> str:
    """What the README shows: the stamp and the headline table (the full tables stay in peers.md)."""
    text = markdown(rows, stamp)
    return text.split("\n### ", 1)[0].rstrip() + (
        "\n\nEvery tool and method, per use case, with the reasons where a tool has no such setting: "
        "[benchmarks/results/peers.md](benchmarks/results/peers.md).\n\n"
        "![best metric per tool against the bit setting](benchmarks/results/peers.png)\n"
    )


def write_reports(rows: list[dict], stamp: dict, out: Path) -> str:
    """peers.json, peers.md and peers.png into ``out``; the markdown."""
    text = markdown(rows, stamp)
    summary = {"stamp": stamp, "headline": headline(rows), "rows": rows}
    (out / "peers.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "peers.md").write_text(text)
    plot(rows, stamp, out / "peers.png")
    return text

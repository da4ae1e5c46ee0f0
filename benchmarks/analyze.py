"""``tinyptq analyze`` on ic and kws at W4A4: wall time of the whole command, the fix and its result.

Each use case runs the command as a user would (a fresh process, ``--apply``,
the built-in ``gptq`` pipeline at W4A4); the target is under 3 minutes each on
2 cores. The report is checked: every plot of the HTML decodes as a PNG, and,
where a Chromium is installed, the page is opened headless and its DOM must
hold every plot with its image data. Writes ``benchmarks/results/analyze.{json,md}``.
Usage::

    python benchmarks/analyze.py --data-dir ../shared/data [--use-cases ic,kws] [--pipeline gptq]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = 180.0
PLOTS = ("split", "units", "units_sqnr", "tensor_sqnr", "histograms", "stages", "fix")
_IMG = re.compile(r'<img id="plot-([a-z_]+)"[^>]*src="data:image/png;base64,([^"]+)"')


def plots_in(html: str) -> dict[str, bool]:
    """Plot id -> whether its image decodes as a PNG."""
    found = {pid: base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for pid, data in _IMG.findall(html)}
    return {pid: found.get(pid, False) for pid in PLOTS}


def browser_check(page: Path) -> dict[str, object]:
    """Open the page in headless Chromium: the plots in its DOM, and a screenshot's size (None: no browser)."""
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        return {"browser": None}
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    shot = page.with_suffix(".png")
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1400,9000", page.as_uri()],
                   capture_output=True, timeout=120)
    return {
        "browser": Path(browser).name,
        "plots_in_dom": sorted(pid for pid, ok in plots_in(dom).items() if ok),
        "screenshot_bytes": shot.stat().st_size if shot.exists() else 0,
    }


def run(use_case: str, pipeline: str, data_dir: str | None, out: Path) -> dict[str, object]:
    """One ``tinyptq analyze --apply`` in a fresh process; its numbers and checks."""
    cmd = [sys.executable, "-m", "tinyptq.cli", "analyze", "--use-case", use_case, "--pipeline", pipeline,
           "--weight-bits", "4", "--act-bits", "4", "--apply", "--out", str(out)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{use_case}: analyze failed: {proc.stderr.strip().splitlines()[-1:]}")
    a = json.loads((out / "analysis.json").read_text())
    fix = a["fix"]
    split = {row["setting"]: row["metric"] for row in a["split"]}
    cost = fix["cost"]
    return {
        "use_case": use_case,
        "pipeline": pipeline,
        "bits": "W4A4",
        "seconds": round(seconds, 1),
        "met": seconds < TARGET_SECONDS,
        "phases": a["seconds"],
        "fp32": split["fp32"],
        "quantized": split["both"],
        "weights_only": split["weights only"],
        "activations_only": split["activations only"],
        "fix": fix["selected"],
        "recovered": round(fix["recovered"], 3) if fix["selected"] else None,
        "weight_bytes": cost["weight_bytes"] if cost else None,
        "peak_activation_bytes": cost["peak_activation_bytes"] if cost else None,
        "predicted": fix["predicted_metric"],
        "applied": fix["applied"],
        "plots": plots_in((out / "analysis.html").read_text()),
        "browser": browser_check(out / "analysis.html"),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "# `tinyptq analyze` at W4A4 (built-in gptq pipeline, --apply)",
        "",
        f"Wall time of the whole command in a fresh process on {os.cpu_count()} cores ({platform.machine()}); "
        f"target under {TARGET_SECONDS:.0f} s. Accuracy on the use case's evaluation set.",
        "",
        "| use case | seconds | FP32 | W4A4 | weights only | activations only | fix (kept at 8 bits) "
        "| weight bytes | peak activation bytes | predicted | applied | plots (HTML / browser DOM) |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        dom = r["browser"].get("plots_in_dom")
        applied = r["applied"] or {}
        lines.append(
            f"| {r['use_case']} | {r['seconds']:.0f} | {r['fp32']:.2f} | {r['quantized']:.2f} "
            f"| {r['weights_only']:.2f} | {r['activations_only']:.2f} | {', '.join(r['fix']) or '-'} "
            f"| {_pair(r['weight_bytes'])} | {_pair(r['peak_activation_bytes'])} "
            f"| {r['predicted'] if r['predicted'] is None else format(r['predicted'], '.2f')} "
            f"| {applied.get('metric_before', float('nan')):.2f} -> {applied.get('metric_after', float('nan')):.2f} "
            f"| {sum(r['plots'].values())}/{len(PLOTS)} / {'-' if dom is None else f'{len(dom)}/{len(PLOTS)}'} |"
        )
    return "\n".join(lines) + "\n"


def _pair(v: list[int] | None) -> str:
    return "-" if not v else f"{v[0]:,} -> {v[1]:,}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("TINYPTQ_DATA_DIR"))
    parser.add_argument("--use-cases", default="ic,kws")
    parser.add_argument("--pipeline", default="gptq")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for uc in args.use_cases.split(","):
            rows.append(run(uc, args.pipeline, args.data_dir, Path(tmp) / uc))
            print(f"{uc}: {rows[-1]['seconds']:.0f} s, fix {rows[-1]['fix']}, applied {rows[-1]['applied']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "analyze.json").write_text(json.dumps(rows, indent=2))
    (out / "analyze.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()

"""Mixed precision against uniform bit-widths at the same weight memory, with the best rounding recipe.

For each use case and uniform setting (W4A8, W3A8 by default), the same
stages run twice on the same calibration data:

- uniform: ``bn_folding``, ``cle``, ``range_setting`` (MSE), the rounding
  stage, ``bias_correction``, every layer at the setting's bits;
- mixed: the same with ``mixed_precision`` before ``range_setting``, its
  ``weight_kb`` budget set to the uniform model's weight memory (so the mixed
  model is never larger), weight candidates {2, 3, 4, 6, 8}, activations kept
  at the setting's bits.

Rows are appended to ``benchmarks/results/mixed_precision.jsonl`` as they
finish (a rerun skips them); the table goes to ``mixed_precision.{json,md}``.
Usage::

    python benchmarks/mixed_precision.py --data-dir ../shared/data [--use-cases ic,kws] [--rounding adaround]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from tqdm import tqdm

from tinyptq.config import QuantConfig
from tinyptq.cost import CostModel
from tinyptq.models.usecases import get_use_case
from tinyptq.pipeline import MemoryCache, Pipeline, PTQState, create_stage
from tinyptq.sim import QuantSim

RESULTS = Path(__file__).parent / "results"
PREFIX = [("bn_folding", {}), ("cle", {})]
RANGES = ("range_setting", {"weights": "mse", "activations": "mse"})
BIAS = ("bias_correction", {"method": "empirical"})
ROUNDING = {"adaround": ("adaround", {}), "gptq": ("gptq", {}), "nearest": None}


def parse_bits(text: str) -> tuple[int, int]:
    """'W4A8' -> (4, 8)."""
    w, a = text.upper().lstrip("W").split("A")
    return int(w), int(a)


def run(prefix: PTQState, stages: list[tuple[str, dict]]) -> tuple[PTQState, float]:
    """The stages on a copy of the prefix state, and their wall time."""
    start = time.perf_counter()
    state = Pipeline([create_stage(n, o) for n, o in stages]).run(prefix.evolve(copy_graph=True))
    return state, time.perf_counter() - start


def main() -> None:
    """Run the missing rows, then write the table and the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("TINYPTQ_DATA_DIR"))
    parser.add_argument("--use-cases", default="ic,kws")
    parser.add_argument("--bits", default="W4A8,W3A8")
    parser.add_argument("--rounding", default="adaround", choices=sorted(ROUNDING))
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sensitivity", default="sqnr")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "mixed_precision.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []
    done = {(r["use_case"], r["bits"], r["kind"], r["rounding"], r["seed"], r["sensitivity"]) for r in rows}
    rounding = [ROUNDING[args.rounding]] if ROUNDING[args.rounding] else []
    for name in args.use_cases.split(","):
        uc = get_use_case(name, args.data_dir)
        graph = uc.load_graph()
        calib = uc.calibration_data(args.calib_samples, args.seed)
        data = uc.eval_set()
        fp32_scores = graph.predict(data.x)
        fp32 = uc.metric(data, fp32_scores, fp32_scores).value
        for bits in tqdm(args.bits.split(","), desc=name):
            wb, ab = parse_bits(bits)
            config = QuantConfig(weight_bits=wb, act_bits=ab, weight_per_channel=True)
            prefix = Pipeline([create_stage(n, o) for n, o in PREFIX]).run(
                PTQState(graph.copy(), config, calib, seed=args.seed, cache=MemoryCache())
            )
            cost = CostModel(prefix.graph)
            budget = cost.for_config(config).weight_bytes / 1024
            mp = ("mixed_precision", {"weight_kb": budget, "act_candidates": [ab], "sensitivity": args.sensitivity})
            for kind, stages in (
                ("uniform", [RANGES, *rounding, BIAS]),
                ("mixed", [mp, RANGES, *rounding, BIAS]),
            ):
                key = (name, bits, kind, args.rounding, args.seed, args.sensitivity)
                if key in done:
                    continue
                state, seconds = run(prefix, stages)
                metric = uc.metric(data, QuantSim(state).predict(data.x), fp32_scores)
                alloc = [r.details.get("allocation") for r in state.log if r.stage == "mixed_precision"]
                row = {
                    "use_case": name, "bits": bits, "kind": kind, "rounding": args.rounding, "seed": args.seed,
                    "sensitivity": args.sensitivity, "fp32": fp32, "value": metric.value,
                    "weight_kb_budget": round(budget, 3), **cost.for_state(state).summary(),
                    "seconds": round(seconds, 1),
                    "weight_bits": alloc[0]["weight_bits"] if alloc else None,
                }
                rows.append(row)
                with log.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
    summary = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "rows": rows}
    (out / "mixed_precision.json").write_text(json.dumps(summary, indent=2))
    (out / "mixed_precision.md").write_text(markdown(rows))
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    """A line per (use case, bits, rounding, sensitivity, seed): uniform vs mixed at the same weight memory,
    then the mean over seeds."""
    lines = [
        "| use case | setting | rounding | sensitivity | seed | FP32 | uniform | mixed (same weight KiB) | mixed − uniform "
        "| weight KiB uniform / mixed | mixed weight bits per layer |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    def group(r: dict) -> tuple:
        return (r["use_case"], r["bits"], r["rounding"], r["sensitivity"])

    for key in sorted({group(r) for r in rows}):
        pairs = []
        for seed in sorted({r["seed"] for r in rows if group(r) == key}):
            sel = {r["kind"]: r for r in rows if group(r) == key and r["seed"] == seed}
            u, m = sel.get("uniform"), sel.get("mixed")
            if not (u and m):
                continue
            pairs.append((u["value"], m["value"]))
            wbits = " ".join(str(b) for b in (m["weight_bits"] or {}).values())
            lines.append(
                f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {seed} | {u['fp32']:.2f} | {u['value']:.2f} "
                f"| {m['value']:.2f} | {m['value'] - u['value']:+.2f} "
                f"| {u['weight_bytes'] / 1024:.1f} / {m['weight_bytes'] / 1024:.1f} | {wbits} |"
            )
        if len(pairs) > 1:
            mu = sum(p[0] for p in pairs) / len(pairs)
            mm = sum(p[1] for p in pairs) / len(pairs)
            lines.append(
                f"| **{key[0]}** | **{key[1]}** | {key[2]} | {key[3]} | mean of {len(pairs)} | | **{mu:.2f}** "
                f"| **{mm:.2f}** | **{mm - mu:+.2f}** | | |"
            )
    lines += [
        "",
        f"Seeds: calibration sample and reconstruction seed. {os.cpu_count()} cores. Same calibration data and "
        "stages for both columns of a line; the mixed model's weight budget is the uniform model's weight memory.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

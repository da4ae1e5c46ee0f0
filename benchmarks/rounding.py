"""Weight rounding methods side by side: ic and kws at W4A8, W3A8, W2A8 and W4A4.

For every use case, bit setting and first/last-layer choice (kept at 8 bits,
model input included, or every layer at the setting's bits), the common
prefix ``bn_folding``, ``cle``, ``range_setting`` (MSE weights and
activations, per-channel weights) runs once; each method then runs on a copy:

- nearest: ``bias_correction`` only (no rounding stage)
- adaround, adaround+qdrop, brecq, brecq+qdrop, gptq: that stage, then
  ``bias_correction``
- brecq+qdrop+steps (A4 settings only): brecq with QDrop and learned
  activation steps

Each row holds the metric, the prefix time and the method's time (the
rounding stage, bias correction). Rows are appended to
``benchmarks/results/rounding.jsonl`` as they finish (a rerun skips rows
already there, so an interrupted run resumes); the table goes to
``rounding.{json,md,png}``. Also measured, per use case: the float model with
only its input quantized at the A-bits (is the model input the limit?).
Usage::

    python benchmarks/rounding.py --data-dir ../shared/data [--use-cases ic,kws] [--bits W4A4,W4A8]
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
from tinyptq.executor import ACTIVATION, WEIGHT
from tinyptq.models.usecases import get_use_case
from tinyptq.pipeline import Pipeline, PTQState, create_stage
from tinyptq.sim import QuantSim

PREFIX = [
    ("bn_folding", {}),
    ("cle", {}),
    ("range_setting", {"weights": "mse", "activations": "mse"}),
]
BIAS = ("bias_correction", {"method": "empirical"})
METHODS: dict[str, list[tuple[str, dict]]] = {
    "nearest": [],
    "adaround": [("adaround", {})],
    "adaround+qdrop": [("adaround", {"qdrop": 0.5})],
    "brecq": [("brecq", {})],
    "brecq+qdrop": [("brecq", {"qdrop": 0.5})],
    "gptq": [("gptq", {})],
    "brecq+qdrop+steps": [("brecq", {"qdrop": 0.5, "learn_act_steps": True})],
}
A4_ONLY = {"brecq+qdrop+steps"}
BITS = ["W4A4", "W4A8", "W3A8", "W2A8"]
FIRST_LAST = {"first/last 8-bit": True, "all layers": False}
RESULTS = Path(__file__).parent / "results"


def parse_bits(text: str) -> tuple[int, int]:
    """'W4A8' -> (4, 8)."""
    w, a = text.upper().lstrip("W").split("A")
    return int(w), int(a)


def run_setting(
    uc, graph, calib, data, fp32_scores, bits: str, keep: bool, seed: int, done: set, sink, wanted=METHODS
) -> None:
    """Every (wanted) method of one bit setting, sharing the prefix; each finished row goes to ``sink``."""
    wb, ab = parse_bits(bits)
    methods = [
        m
        for m in METHODS
        if m in wanted and (m not in A4_ONLY or ab <= 4) and (uc.name, bits, keep, m) not in done
    ]
    if not methods:
        return
    config = QuantConfig(
        weight_bits=wb, act_bits=ab, weight_per_channel=True, keep_first_last_8bit=keep
    )
    start = time.perf_counter()
    prefix = Pipeline([create_stage(n, o) for n, o in PREFIX]).run(
        PTQState(graph.copy(), config, calib, seed=seed)
    )
    prefix_seconds = time.perf_counter() - start
    for method in methods:
        stages = [create_stage(n, o) for n, o in [*METHODS[method], BIAS]]
        start = time.perf_counter()
        state = Pipeline(stages).run(prefix.evolve(copy_graph=True))
        seconds = time.perf_counter() - start
        metric = uc.metric(data, QuantSim(state).predict(data.x), fp32_scores)
        rounding = [r.seconds for r in state.log if r.stage in ("adaround", "brecq", "gptq")]
        sink(
            {
                "use_case": uc.name,
                "bits": bits,
                "first_last_8bit": keep,
                "method": method,
                "metric": metric.name,
                "fp32": uc.metric(data, fp32_scores, fp32_scores).value,
                "value": metric.value,
                "prefix_seconds": round(prefix_seconds, 2),
                "method_seconds": round(seconds, 2),
                "rounding_seconds": round(rounding[0], 2) if rounding else 0.0,
            }
        )


def input_only(uc, graph, calib, data, fp32_scores, act_bits: int, seed: int) -> float:
    """The float model with only its input quantized (MSE range) at ``act_bits``: the input's own limit."""
    config = QuantConfig(weight_bits=8, act_bits=act_bits, weight_per_channel=True)
    stages = [create_stage("range_setting", {"weights": "mse", "activations": "mse"})]
    state = Pipeline(stages).run(PTQState(graph.copy(), config, calib, seed=seed))
    sim = QuantSim(state)
    inputs = {p.name for p in graph.act_points() if p.is_input}
    for name in sim.executor.weight_quantizers:
        sim.disable(name, WEIGHT)
    for name in sim.executor.act_quantizers:
        if name not in inputs:
            sim.disable(name, ACTIVATION)
    return uc.metric(data, sim.predict(data.x), fp32_scores).value


def markdown(rows: list[dict], fp32: dict, inputs: dict) -> str:
    """A table per use case: a row per bit setting and first/last choice, a column per method."""
    lines = []
    for name in sorted({r["use_case"] for r in rows}):
        mine = [r for r in rows if r["use_case"] == name]
        lines += [f"### {name} (FP32 {fp32[name]:.2f} %, {mine[0]['metric']})", ""]
        lines += [
            "| bits | first/last | " + " | ".join(METHODS) + " |",
            "|---|---|" + "---|" * len(METHODS),
        ]
        for bits in BITS:
            for label, keep in FIRST_LAST.items():
                sel = {
                    r["method"]: r
                    for r in mine
                    if r["bits"] == bits and r["first_last_8bit"] == keep
                }
                if not sel:
                    continue
                best = max(r["value"] for r in sel.values())
                cells = []
                for m in METHODS:
                    r = sel.get(m)
                    if r is None:
                        cells.append("")
                        continue
                    value = f"**{r['value']:.2f}**" if r["value"] == best else f"{r['value']:.2f}"
                    cells.append(f"{value} ({r['method_seconds']:.0f} s)")
                lines.append(f"| {bits} | {label} | " + " | ".join(cells) + " |")
        lines.append("")
        for key, value in sorted(inputs.items()):
            if key.startswith(name + ":"):
                lines.append(
                    f"- float model, only its input at {key.split(':')[1]} bits: {value:.2f}"
                )
        lines.append("")
    lines.append(
        "Cells: metric (time of the rounding stage plus bias correction on "
        f"{os.cpu_count()} cores; the shared prefix is not included). Best of a row in bold."
    )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], fp32: dict, path: Path) -> None:
    """Accuracy against weight bits (A8 settings, every layer quantized) per method and use case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["use_case"] for r in rows})
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for method in METHODS:
            pts = sorted(
                (parse_bits(r["bits"])[0], r["value"])
                for r in rows
                if r["use_case"] == name
                and r["method"] == method
                and r["bits"].endswith("A8")
                and not r["first_last_8bit"]
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        ax.axhline(fp32[name], color="k", ls="--", lw=0.8, label="FP32")
        ax.set(
            title=f"{name}: every layer at W-bits, A8",
            xlabel="weight bits",
            ylabel="accuracy (%)",
            xticks=[2, 3, 4],
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    """Run the missing rows, then write the table, the JSON and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("TINYPTQ_DATA_DIR"))
    parser.add_argument("--use-cases", default="ic,kws")
    parser.add_argument("--bits", default=",".join(BITS))
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="calibration sample and reconstruction seed")
    parser.add_argument("--methods", default=",".join(METHODS), help="subset of: " + ", ".join(METHODS))
    parser.add_argument("--first-last", default=",".join(FIRST_LAST), help="subset of: " + ", ".join(FIRST_LAST))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "rounding.jsonl"
    rows = (
        [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        if log.exists()
        else []
    )
    done = {(r["use_case"], r["bits"], r["first_last_8bit"], r["method"]) for r in rows}
    fp32: dict[str, float] = {r["use_case"]: r["fp32"] for r in rows}
    inputs: dict[str, float] = {}

    def sink(row: dict) -> None:
        rows.append(row)
        with log.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    wanted = args.bits.split(",")
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS] + [k for k in args.first_last.split(",") if k not in FIRST_LAST]
    if unknown:
        parser.error(f"unknown method or first/last choice: {', '.join(unknown)}")
    for name in args.use_cases.split(","):
        uc = get_use_case(name, args.data_dir)
        graph = uc.load_graph()
        calib = uc.calibration_data(args.calib_samples, args.seed)
        data = uc.eval_set()
        fp32_scores = graph.predict(data.x)
        fp32[name] = uc.metric(data, fp32_scores, fp32_scores).value
        for ab in sorted({parse_bits(b)[1] for b in wanted}):
            inputs[f"{name}:{ab}"] = input_only(uc, graph, calib, data, fp32_scores, ab, args.seed)
        settings = [(b, FIRST_LAST[k]) for b in wanted for k in args.first_last.split(",")]
        for bits, keep in tqdm(settings, desc=name):
            run_setting(uc, graph, calib, data, fp32_scores, bits, keep, args.seed, done, sink, methods)
    summary = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "calib_samples": args.calib_samples,
        "fp32": fp32,
        "input_only": inputs,
        "rows": rows,
    }
    (out / "rounding.json").write_text(json.dumps(summary, indent=2))
    (out / "rounding.md").write_text(markdown(rows, fp32, inputs))
    plot(rows, fp32, out / "rounding.png")
    print(markdown(rows, fp32, inputs))


if __name__ == "__main__":
    main()

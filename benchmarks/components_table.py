"""Each PTQ component added one at a time: ic, kws and vww at W8A8, W6A8, W4A8.

Writes ``benchmarks/results/components_table.{md,json}``. Usage::

    python benchmarks/components_table.py --data-dir ../shared/data [--use-cases ic,kws,vww]

The model, the calibration set, the evaluation set and the FP32 scores are
computed once per use case; every configuration starts from a fresh copy of the
graph.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tqdm import tqdm

from tinyptq.config import QuantConfig
from tinyptq.models.usecases import get_use_case
from tinyptq.pipeline import Pipeline, PTQState
from tinyptq.pipeline_file import PipelineSpec
from tinyptq.sim import QuantSim

# cumulative: each row adds one component to the one before
STEPS: list[tuple[str, list]] = [
    ("min-max", ["range_setting"]),
    ("+ BN folding", ["bn_folding", "range_setting"]),
    ("+ CLE", ["bn_folding", "cle", "range_setting"]),
    ("+ MSE ranges", ["bn_folding", "cle", {"range_setting": {"weights": "mse", "activations": "mse"}}]),
    (
        "+ bias correction",
        [
            "bn_folding",
            "cle",
            {"range_setting": {"weights": "mse", "activations": "mse"}},
            {"bias_correction": {"method": "empirical"}},
        ],
    ),
]
BITS = [(8, 8), (6, 8), (4, 8)]
GRANULARITY = {"per-tensor": False, "per-channel": True}


def run_use_case(name: str, data_dir: str, calib_samples: int, seed: int) -> list[dict]:
    """All configurations of one use case."""
    uc = get_use_case(name, data_dir)
    graph = uc.load_graph()
    calib = uc.calibration_data(calib_samples, seed)
    data = uc.eval_set()
    fp32_scores = graph.predict(data.x)
    fp32 = uc.metric(data, fp32_scores, fp32_scores)
    rows = []
    combos = [(g, b, s) for g in GRANULARITY for b in BITS for s in STEPS]
    for gran, (wb, ab), (label, stages) in tqdm(combos, desc=name, leave=False):
        spec = PipelineSpec.from_dict({"stages": stages})
        config = QuantConfig(weight_bits=wb, act_bits=ab, weight_per_channel=GRANULARITY[gran])
        start = time.perf_counter()
        state = PTQState(graph.copy(), config, calib, seed=seed)
        state = Pipeline.from_spec(spec).run(state)
        metric = uc.metric(data, QuantSim(state).predict(data.x), fp32_scores)
        rows.append(
            {
                "use_case": name,
                "granularity": gran,
                "bits": f"W{wb}A{ab}",
                "step": label,
                "metric": metric.name,
                "fp32": fp32.value,
                "value": metric.value,
                "extras": metric.extras,
                "seconds": round(time.perf_counter() - start, 2),
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    """One table: a row per use case / granularity / bits, a column per cumulative step."""
    labels = [label for label, _ in STEPS]
    lines = [
        "| use case | weights | bits | FP32 | " + " | ".join(labels) + " |",
        "|---|---|---|---|" + "---|" * len(labels),
    ]
    keys = sorted({(r["use_case"], r["granularity"], r["bits"]) for r in rows}, key=_order)
    for uc, gran, bits in keys:
        sel = {r["step"]: r for r in rows if (r["use_case"], r["granularity"], r["bits"]) == (uc, gran, bits)}
        fp32 = next(iter(sel.values()))["fp32"]
        cells = [f"{sel[label]['value']:.2f}" if label in sel else "" for label in labels]
        lines.append(f"| {uc} | {gran} | {bits} | {fp32:.2f} | " + " | ".join(cells) + " |")
    metrics = sorted({(r["use_case"], r["metric"]) for r in rows})
    lines.append("")
    lines.extend(f"- {uc}: {m}" for uc, m in metrics)
    return "\n".join(lines) + "\n"


def _order(key: tuple[str, str, str]) -> tuple:
    uc, gran, bits = key
    return (uc, list(GRANULARITY).index(gran), -int(bits[1 : bits.index("A")]))


def main() -> None:
    """Run the grid and write the results files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--use-cases", default="ic,kws,vww")
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    rows: list[dict] = []
    for name in args.use_cases.split(","):
        rows.extend(run_use_case(name, args.data_dir, args.calib_samples, args.seed))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "components_table.json").write_text(json.dumps(rows, indent=2))
    (out / "components_table.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()

"""Does the deployed model reproduce the simulation? ic accuracy of model.qdq.onnx vs QuantSim.

For each pipeline and bit setting: quantize ic, export the QDQ ONNX, run it in
onnxruntime (QuantizeLinear / DequantizeLinear as written) on the whole test
batch and compare accuracy and per-image top-1 with the simulation. Writes
``benchmarks/results/export_agreement.{md,json}``. Usage::

    python benchmarks/export_agreement.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from tinyptq import api
from tinyptq.export.qdq_onnx import export_qdq, onnx_predict, onnx_session
from tinyptq.metrics import accuracy

FULL = [
    "bn_folding",
    "cle",
    {"range_setting": {"weights": "mse", "activations": "mse"}},
    {"bias_correction": {"method": "empirical"}},
]
PIPELINES = {
    "min-max": [{"range_setting": {"weights": "minmax", "activations": "minmax"}}],
    "BN folding + CLE + min-max": ["bn_folding", "cle", {"range_setting": {}}],
    "BN folding + CLE + MSE + bias correction": FULL,
}
BITS = [(8, 8), (4, 8)]


def measure(data_dir: str, pipeline: list, wb: int, ab: int, out: Path) -> dict:
    """Simulation vs onnxruntime on the ic test batch for one configuration."""
    spec = {"quant": {"weight_per_channel": True}, "calibration": {"samples": 256, "seed": 0}, "stages": pipeline}
    result = api.quantize("ic", spec, data_dir, weight_bits=wb, act_bits=ab)
    from tinyptq.models.usecases import get_use_case

    data = get_use_case("ic", data_dir).eval_set()
    sim_scores = result.sim.predict(data.x)
    path = export_qdq(result.state, out / f"ic_w{wb}a{ab}.qdq.onnx")
    ort_scores = onnx_predict(onnx_session(path), data.x)
    same = int(np.sum(np.argmax(sim_scores, -1) == np.argmax(ort_scores, -1)))
    sim_acc, ort_acc = accuracy(data.y, sim_scores), accuracy(data.y, ort_scores)
    return {
        "bits": f"W{wb}A{ab}",
        "sim_accuracy": round(sim_acc, 2),
        "onnx_accuracy": round(ort_acc, 2),
        "difference": round(ort_acc - sim_acc, 2),
        "same_top1": same,
        "samples": len(data.x),
        "max_abs_output_difference": float(np.max(np.abs(sim_scores - ort_scores))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, pipeline in PIPELINES.items():
            for wb, ab in BITS:
                row = {"pipeline": name, **measure(args.data_dir, pipeline, wb, ab, Path(tmp))}
                print(row, flush=True)
                rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "export_agreement.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "# ic: accuracy of model.qdq.onnx in onnxruntime vs the simulation",
        "",
        "Per-channel weights, 256 calibration images, CIFAR-10 test batch (466 images: one image is 0.21 points).",
        "",
        "| pipeline | bits | simulation | onnxruntime | difference | same top-1 | max abs output diff (softmax) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pipeline']} | {r['bits']} | {r['sim_accuracy']:.2f} | {r['onnx_accuracy']:.2f} | "
            f"{r['difference']:+.2f} | {r['same_top1']}/{r['samples']} | {r['max_abs_output_difference']:.4f} |"
        )
    (out / "export_agreement.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

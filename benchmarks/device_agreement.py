"""Does the simulation predict the device? Exported .tflite files in TFLite Micro against the targets.

For every use case at W8A8 (per-channel weights; BN folding, CLE, MSE ranges,
bias correction) and for ic at W4A8 (4-bit kernels packed as INT4), the
exported .tflite runs over the whole evaluation set in TFLite Micro (one
invoke per sample, as on a device), in tf.lite with its reference kernels and
in tf.lite as shipped (XNNPACK); the ``tflite`` target (integer simulation)
and the ``qdq`` target (float fake-quant simulation) compute the same
samples. Counted: output values that differ from TFLite Micro's, top-1
decisions that differ, and each one's metric. File sizes of the int4 and the
int8 file are reported side by side.

Second table: ic and kws at W8A8, W4A8 and W4A4 (the same pipeline), the
QDQ ONNX export run by onnxruntime with its default graph optimizations
(which fuse parts of it into integer kernels), against the ``onnxruntime``
target (tinyptq.intsim.ort_sim) and the ``qdq`` target.

Writes ``benchmarks/results/device_agreement.{json,md}``. Usage::

    python benchmarks/device_agreement.py --data-dir ../shared/data [--use-cases ic,kws]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from tinyptq import runtimes
from tinyptq.config import QuantConfig
from tinyptq.export.tflite import tflite_bytes
from tinyptq.intsim.tflite_sim import TfliteSim
from tinyptq.models.usecases import get_use_case
from tinyptq.pipeline import Pipeline, PTQState, create_stage
from tinyptq.sim import QuantSim

USE_CASES = ["ic", "kws", "kws-mlperf", "vww", "ad"]
ORT_USE_CASES = ("ic", "kws")
ORT_BITS = [(8, 8), (4, 8), (4, 4)]
RESULTS = Path(__file__).parent / "results"


def build_state(uc, graph, calib, weight_bits: int, seed: int, act_bits: int = 8):
    """BN folding (when the model has batch norms), CLE, MSE ranges, bias correction."""
    names = (["bn_folding", "cle"] if graph.batch_norm_names() else []) + ["range_setting", "bias_correction"]
    options = {"range_setting": {"weights": "mse", "activations": "mse"}}
    stages = [create_stage(n, options.get(n, {})) for n in names]
    config = QuantConfig(weight_bits=weight_bits, act_bits=act_bits, weight_per_channel=True)
    return Pipeline(stages).run(PTQState(graph.copy(), config, calib, seed=seed))


def compare(reference: np.ndarray, other: np.ndarray) -> dict:
    """Differing output values and differing top-1 decisions (last axis) against ``reference``."""
    row = {"differing_values": int(np.sum(reference != other)), "values": int(reference.size)}
    if reference.ndim == 2 and reference.shape[1] > 1:
        row["differing_top1"] = int(np.sum(reference.argmax(1) != other.argmax(1)))
    return row


def measure(name: str, data_dir, bits: int, seed: int) -> dict:
    """One use case at one weight bit-width: every runtime and target on the whole evaluation set."""
    uc = get_use_case(name, data_dir)
    graph = uc.load_graph()
    calib = uc.calibration_data(uc.calibration_size, seed)
    data = uc.eval_set()
    fp32 = graph.predict(data.x)
    state = build_state(uc, graph, calib, bits, seed)
    model = tflite_bytes(state)
    outputs, seconds = {}, {}
    for label, run in [
        ("tflm", lambda: runtimes.run(model, data.x, "tflm")),
        ("tflite-ref", lambda: runtimes.run(model, data.x, "tflite-ref")),
        ("tflite (XNNPACK)", lambda: runtimes.run(model, data.x, "tflite")),
        ("sim target tflite", lambda: TfliteSim(state).predict(data.x)),
        ("sim target qdq", lambda: QuantSim(state).predict(data.x)),
    ]:
        start = time.perf_counter()
        outputs[label] = run()
        seconds[label] = round(time.perf_counter() - start, 2)
    row = {"use_case": name, "weight_bits": bits, "samples": len(data.x), "file_bytes": len(model)}
    if bits < 8:
        row["int8_file_bytes"] = len(tflite_bytes(build_state(uc, graph, calib, 8, seed)))
    for label, out in outputs.items():
        metric = uc.metric(data, out, fp32)
        row[label] = {"metric": metric.name, "value": metric.value, "seconds": seconds[label]}
        if label != "tflm":
            row[label].update(compare(outputs["tflm"], out))
    return row


def measure_ort(name: str, data_dir, bits: tuple[int, int], seed: int, batch: int = 128) -> dict:
    """One use case at W/A bits: onnxruntime (default optimizations) on the QDQ export against the targets."""
    import onnxruntime as ort

    from tinyptq.export.qdq_onnx import qdq_model
    from tinyptq.intsim.ort_sim import OrtSim

    uc = get_use_case(name, data_dir)
    graph = uc.load_graph()
    calib = uc.calibration_data(uc.calibration_size, seed)
    data = uc.eval_set()
    fp32 = graph.predict(data.x)
    state = build_state(uc, graph, calib, bits[0], seed, bits[1])
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(qdq_model(state).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0].name
    x = np.asarray(data.x, np.float32)
    outputs = {
        "onnxruntime": np.concatenate([session.run(None, {inp: x[i : i + batch]})[0] for i in range(0, len(x), batch)]),
        "sim target onnxruntime": OrtSim(state).predict(x, batch_size=batch),
        "sim target qdq": QuantSim(state).predict(x),
    }
    row = {"use_case": name, "bits": f"W{bits[0]}A{bits[1]}", "samples": len(x)}
    for label, out in outputs.items():
        metric = uc.metric(data, out, fp32)
        row[label] = {"metric": metric.name, "value": metric.value}
        if label != "onnxruntime":
            row[label].update(compare(outputs["onnxruntime"], out))
    return row


def markdown_ort(rows: list[dict]) -> str:
    """The onnxruntime table: its default session against the two targets."""
    lines = [
        "| use case | bits | samples | onnxruntime metric | target onnxruntime: metric, values ≠ (top-1 ≠) "
        "| target qdq: metric, values ≠ (top-1 ≠) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            f"{r[lb]['value']:.2f}, {r[lb]['differing_values']} of {r[lb]['values']} ({r[lb].get('differing_top1', '-')})"
            for lb in ("sim target onnxruntime", "sim target qdq")
        ]
        lines.append(f"| {r['use_case']} | {r['bits']} | {r['samples']} | {r['onnxruntime']['value']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict]) -> str:
    """The agreement table: every runtime / target against TFLite Micro."""
    labels = ["tflite-ref", "tflite (XNNPACK)", "sim target tflite", "sim target qdq"]
    lines = [
        "| use case | weights | samples | TFLM metric | "
        + " | ".join(f"{lb}: values ≠ TFLM (top-1 ≠)" for lb in labels)
        + " | file bytes |",
        "|---|---|---|---|" + "---|" * len(labels) + "---|",
    ]
    for r in rows:
        cells = []
        for lb in labels:
            c = r[lb]
            classes = r["tflm"]["metric"] in ("accuracy", "top-1 agreement with FP32")
            top = f" ({c['differing_top1']})" if classes and "differing_top1" in c else ""
            cells.append(f"{c['differing_values']} of {c['values']}{top}")
        size = f"{r['file_bytes']}" + (
            f" ({100 * r['file_bytes'] / r['int8_file_bytes']:.1f} % of int8 {r['int8_file_bytes']})"
            if "int8_file_bytes" in r
            else ""
        )
        tflm = r["tflm"]
        lines.append(
            f"| {r['use_case']} | {r['weight_bits']}-bit | {r['samples']} | {tflm['value']:.2f} | "
            + " | ".join(cells)
            + f" | {size} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    """Measure every use case (and ic at 4-bit weights); write the JSON and the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("TINYPTQ_DATA_DIR"))
    parser.add_argument("--use-cases", default=",".join(USE_CASES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--render", action="store_true", help="only rewrite the Markdown from the JSON")
    args = parser.parse_args()
    out = Path(args.out)
    if args.render:
        summary = json.loads((out / "device_agreement.json").read_text())
    else:
        rows, ort_rows = [], []
        for name in args.use_cases.split(","):
            for bits in [8, 4] if name == "ic" else [8]:
                rows.append(measure(name, args.data_dir, bits, args.seed))
                print(json.dumps(rows[-1]), flush=True)
            if name in ORT_USE_CASES:
                for bits in ORT_BITS:
                    ort_rows.append(measure_ort(name, args.data_dir, bits, args.seed))
                    print(json.dumps(ort_rows[-1]), flush=True)
        machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "cpu": _cpu()}
        summary = {"machine": machine, "rows": rows, "onnxruntime_rows": ort_rows}
        out.mkdir(parents=True, exist_ok=True)
        (out / "device_agreement.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = markdown(summary["rows"]) + "\n" + markdown_ort(summary.get("onnxruntime_rows", []))
    (out / "device_agreement.md").write_text(text)
    print(text)


def _cpu() -> str:
    """The CPU model (onnxruntime's kernels depend on its instruction set)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()

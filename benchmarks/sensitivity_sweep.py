"""Per-layer weight sensitivity of ic (ResNet-8): one changeable QuantSim vs a rebuild per point.

Base state: ``bn_folding`` then ``range_setting`` (min-max, per-channel weights)
at W8A8. For every quantizable layer and every weight bit-width, only that
layer's kernel is quantized (per channel, symmetric, min-max range), every
other quantizer is off, and the SQNR of the model output against the float
model output on the calibration images is measured. The sweep runs twice,
timed separately:

1. changeable handle: one ``QuantSim``, encodings set and quantizers switched
   on and off in place (no rebuild);
2. rebuild per point: a new ``QuantSim`` of a state holding only that layer's
   weight encoding.

Both must give bit-identical outputs. Writes
``benchmarks/results/sensitivity_sweep.{json,md,png}``. Usage::

    python benchmarks/sensitivity_sweep.py --data-dir ../shared/data [--samples 256] [--bits 2,3,4,6,8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tinyptq._tf import tf
from tinyptq.config import QuantConfig
from tinyptq.executor import ACTIVATION, WEIGHT
from tinyptq.metrics import sqnr_db
from tinyptq.models.usecases import get_use_case
from tinyptq.pipeline import Pipeline, PTQState
from tinyptq.pipeline_file import PipelineSpec
from tinyptq.quant import Encoding, QuantSpec
from tinyptq.sim import QuantSim

STAGES = ["bn_folding", {"range_setting": {"weights": "minmax", "activations": "minmax"}}]
BATCH_SIZE = 256


def base_state(data_dir: str | None, samples: int, seed: int) -> PTQState:
    """ic after BN folding and min-max range setting at W8A8, per-channel weights."""
    uc = get_use_case("ic", data_dir)
    graph = uc.load_graph()
    calib = uc.calibration_data(samples, seed)
    config = QuantConfig(weight_bits=8, act_bits=8, weight_per_channel=True)
    spec = PipelineSpec.from_dict({"stages": STAGES})
    return Pipeline.from_spec(spec).run(PTQState(graph, config, calib, seed=seed))


def kernel_encoding(state: PTQState, layer: str, bits: int) -> Encoding:
    """Symmetric min-max encoding of ``layer``'s kernel, per output channel when the layer has one."""
    kernel = state.graph.kernel(layer)
    axis = state.graph.quant_layer(layer).channel_axis
    spec = QuantSpec(bits=bits, symmetric=True, per_channel=axis is not None)
    if axis is None:
        return Encoding.from_range(kernel.min(), kernel.max(), spec)
    axis %= kernel.ndim
    others = tuple(i for i in range(kernel.ndim) if i != axis)
    return Encoding.from_range(kernel.min(axis=others), kernel.max(axis=others), spec, axis=axis)


def disable_all(sim: QuantSim) -> None:
    """Every activation and weight quantizer of ``sim`` off (the float model)."""
    for name in sim.executor.act_quantizers:
        sim.disable(name, ACTIVATION)
    for name in sim.executor.weight_quantizers:
        sim.disable(name, WEIGHT)


def traces(sim: QuantSim) -> int:
    """How many times the sim's compiled functions were traced so far."""
    return sum(fn.experimental_get_tracing_count() for fn in sim.executor._compiled.values())


def sweep_handle(state: PTQState, points: list, encodings: dict, x: np.ndarray) -> dict:
    """The sweep on one QuantSim changed in place; outputs, seconds and trace counts."""
    start = time.perf_counter()
    sim = QuantSim(state)
    disable_all(sim)
    built = time.perf_counter() - start
    compiled_before = len(sim.executor._compiled)
    outputs = {}
    first_point = None
    for layer, bits in tqdm(points, desc="changeable handle", leave=False):
        t0 = time.perf_counter()
        sim.set_encoding(layer, encodings[layer, bits], kind=WEIGHT)
        sim.enable(layer, WEIGHT)
        outputs[layer, bits] = sim.predict(x, BATCH_SIZE)
        sim.disable(layer, WEIGHT)
        if first_point is None:
            first_point = time.perf_counter() - t0
    seconds = time.perf_counter() - start
    return {
        "outputs": outputs,
        "seconds": seconds,
        "build_seconds": built,
        "first_point_seconds": first_point,
        "compiled_functions_before": compiled_before,
        "compiled_functions_after": len(sim.executor._compiled),
        "traces": traces(sim),
    }


def sweep_rebuild(state: PTQState, points: list, encodings: dict, x: np.ndarray) -> dict:
    """The sweep with a new QuantSim per point, holding only that layer's weight encoding."""
    start = time.perf_counter()
    outputs = {}
    total_traces = 0
    for layer, bits in tqdm(points, desc="rebuild per point", leave=False):
        sim = QuantSim(state.evolve(weight_encodings={layer: encodings[layer, bits]}, act_encodings={}))
        outputs[layer, bits] = sim.predict(x, BATCH_SIZE)
        total_traces += traces(sim)
    return {"outputs": outputs, "seconds": time.perf_counter() - start, "traces": total_traces}


def machine_info() -> dict:
    """Cores, CPU model and library versions of this run."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "numpy": np.__version__,
    }


def markdown(result: dict) -> str:
    """The timing table and the layer x bits SQNR table."""
    t, bits = result["timing"], result["bits"]
    lines = [
        "# ic (ResNet-8): per-layer weight sensitivity sweep",
        "",
        f"Base: {' -> '.join(result['base_stages'])} at W8A8, per-channel weights. Per point only one layer's "
        "kernel is quantized (per channel, symmetric, min-max), all other quantizers off; SQNR of the model "
        f"output ({result['output']}, softmax) vs the float model on {result['samples']} calibration images. "
        f"{result['points']} points ({len(result['layers'])} layers x {len(bits)} bit-widths).",
        "",
        "| way | total s | s / point | TF traces | speedup |",
        "|---|---|---|---|---|",
        f"| changeable handle (one QuantSim) | {t['handle_seconds']:.2f} | {t['handle_seconds_per_point']:.4f} | "
        f"{t['handle_traces']} | {t['speedup']:.1f}x |",
        f"| rebuild per point | {t['rebuild_seconds']:.2f} | {t['rebuild_seconds_per_point']:.4f} | "
        f"{t['rebuild_traces']} | 1.0x |",
        "",
        f"Handle: build {t['handle_build_seconds']:.2f} s, first point (incl. trace) "
        f"{t['handle_first_point_seconds']:.2f} s; compiled functions "
        f"{t['handle_compiled_functions_before']} before the sweep, {t['handle_compiled_functions_after']} after. "
        f"Outputs of the two ways: {'bit-identical' if result['identical'] else 'DIFFERENT'} "
        f"(max abs difference {result['max_abs_difference']:.3g}). Float reference: the executor with every "
        f"quantizer off (max abs difference to the Keras model {result['float_vs_keras_max_abs']:.3g}), "
        "not timed.",
        "",
        "## Output SQNR (dB)",
        "",
        "| layer | " + " | ".join(f"W{b}" for b in bits) + " |",
        "|---|" + "---|" * len(bits),
    ]
    for layer in result["layers"]:
        cells = [f"{result['sqnr_db'][layer][str(b)]:.2f}" for b in bits]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    m = result["machine"]
    lines += ["", f"Machine: {m['usable_cores']} cores ({m['cpu_model']}), TensorFlow {m['tensorflow']}."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Heatmap of SQNR (layer x bits) next to SQNR-vs-bits lines per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, bits = result["layers"], result["bits"]
    grid = np.array([[result["sqnr_db"][layer][str(b)] for b in bits] for layer in layers])
    fig, (ax_map, ax_line) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1, 1.3]})
    image = ax_map.imshow(grid, cmap="viridis", aspect="auto")
    ax_map.set_xticks(range(len(bits)), [f"W{b}" for b in bits])
    ax_map.set_yticks(range(len(layers)), layers)
    ax_map.set_xlabel("weight bits (this layer only)")
    ax_map.set_title("output SQNR (dB)")
    middle = (np.nanmin(grid) + np.nanmax(grid)) / 2
    for i in range(len(layers)):
        for j in range(len(bits)):
            ax_map.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=8,
                        color="black" if grid[i, j] > middle else "white")
    fig.colorbar(image, ax=ax_map, fraction=0.046, pad=0.04)
    cmap = plt.get_cmap("tab10")
    for i, layer in enumerate(layers):
        ax_line.plot(bits, grid[i], marker="o", color=cmap(i % 10), label=layer)
    ax_line.set_xticks(bits)
    ax_line.set_xlabel("weight bits (this layer only)")
    ax_line.set_ylabel("output SQNR (dB)")
    ax_line.grid(alpha=0.3)
    ax_line.legend(fontsize=8, ncol=2, loc="upper left")
    ax_line.set_title("SQNR vs bits per layer")
    fig.suptitle(f"ic ResNet-8: per-layer weight sensitivity ({result['samples']} calibration images)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    """Build the base state, run both sweeps, compare them and write the results files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--bits", default="2,3,4,6,8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    bits = sorted({int(b) for b in args.bits.split(",")})

    state = base_state(args.data_dir, args.samples, args.seed)
    layers = [q.name for q in state.graph.quant_layers()]
    points = [(layer, b) for layer in layers for b in bits]
    encodings = {(layer, b): kernel_encoding(state, layer, b) for layer, b in points}
    x = state.calib

    # shared float reference (untimed): the same executor with every quantizer off;
    # it also warms up TF's kernels, equally for both ways timed below
    reference_sim = QuantSim(state)
    disable_all(reference_sim)
    output = reference_sim.outputs[0]
    reference = reference_sim.predict(x, BATCH_SIZE)
    keras_float = state.graph.predict(x)
    del reference_sim

    handle = sweep_handle(state, points, encodings, x)
    rebuild = sweep_rebuild(state, points, encodings, x)

    diffs = [float(np.max(np.abs(handle["outputs"][p] - rebuild["outputs"][p]))) for p in points]
    identical = all(np.array_equal(handle["outputs"][p], rebuild["outputs"][p]) for p in points)
    sqnr = {layer: {} for layer in layers}
    rows = []
    for layer, b in points:
        s_handle = sqnr_db(reference, handle["outputs"][layer, b])
        s_rebuild = sqnr_db(reference, rebuild["outputs"][layer, b])
        sqnr[layer][str(b)] = round(s_handle, 4)
        rows.append({"layer": layer, "bits": b, "sqnr_db_handle": s_handle, "sqnr_db_rebuild": s_rebuild})

    n = len(points)
    result = {
        "use_case": "ic",
        "base_stages": ["bn_folding", "range_setting"],
        "base_config": "W8A8, per-channel weights, min-max",
        "output": output,
        "samples": int(len(x)),
        "seed": args.seed,
        "bits": bits,
        "layers": layers,
        "points": n,
        "timing": {
            "handle_seconds": round(handle["seconds"], 4),
            "rebuild_seconds": round(rebuild["seconds"], 4),
            "handle_seconds_per_point": round(handle["seconds"] / n, 5),
            "rebuild_seconds_per_point": round(rebuild["seconds"] / n, 5),
            "speedup": round(rebuild["seconds"] / handle["seconds"], 2),
            "handle_build_seconds": round(handle["build_seconds"], 4),
            "handle_first_point_seconds": round(handle["first_point_seconds"], 4),
            "handle_compiled_functions_before": handle["compiled_functions_before"],
            "handle_compiled_functions_after": handle["compiled_functions_after"],
            "handle_traces": handle["traces"],
            "rebuild_traces": rebuild["traces"],
        },
        "identical": identical,
        "max_abs_difference": max(diffs),
        "float_vs_keras_max_abs": float(np.max(np.abs(reference - keras_float))),
        "sqnr_db": sqnr,
        "per_point": rows,
        "machine": machine_info(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sensitivity_sweep.json").write_text(json.dumps(result, indent=2))
    (out / "sensitivity_sweep.md").write_text(markdown(result))
    plot(result, out / "sensitivity_sweep.png")
    print(markdown(result))
    assert identical, f"the two ways differ: max abs difference {max(diffs):.3g}"


if __name__ == "__main__":
    main()

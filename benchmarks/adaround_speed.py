"""Wall time of ``adaround`` (2000 iterations per layer) on ResNet-8 with 512 calibration images.

The target: under 100 s on 2 cores. The prefix (``bn_folding``, ``cle``, MSE
ranges, W4A8 per-channel) is not timed; the stage is, ``--repeats`` times
(the first run includes tracing the per-layer steps). Writes
``benchmarks/results/adaround_speed.{json,md}``. Usage::

    python benchmarks/adaround_speed.py --data-dir ../shared/data [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from tinyptq.config import QuantConfig
from tinyptq.models.usecases import get_use_case
from tinyptq.pipeline import Pipeline, PTQState, create_stage

TARGET_SECONDS = 100.0


def main() -> None:
    """Time the stage and write the result files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("TINYPTQ_DATA_DIR"))
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    uc = get_use_case("ic", args.data_dir)
    graph = uc.load_graph()
    calib = uc.calibration_data(args.calib_samples, 0)
    config = QuantConfig(weight_bits=4, act_bits=8, weight_per_channel=True)
    prefix = [
        create_stage("bn_folding"),
        create_stage("cle"),
        create_stage("range_setting", {"weights": "mse", "activations": "mse"}),
    ]
    state = Pipeline(prefix).run(PTQState(graph, config, calib, seed=0))
    seconds = []
    for _ in range(args.repeats):
        stage = create_stage("adaround", {"iterations": args.iterations})
        start = time.perf_counter()
        done = stage.apply(state)
        seconds.append(time.perf_counter() - start)
    units = done.log[-1].details["units"]
    result = {
        "model": "ic (ResNet-8)",
        "calib_samples": args.calib_samples,
        "iterations_per_layer": args.iterations,
        "layers": len(units),
        "seconds": [round(s, 2) for s in seconds],
        "target_seconds": TARGET_SECONDS,
        "met": max(seconds) < TARGET_SECONDS,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adaround_speed.json").write_text(json.dumps(result, indent=2))
    runs = ", ".join(f"{s:.1f} s" for s in seconds)
    text = (
        f"adaround on ic (ResNet-8, {len(units)} layers), {args.iterations} iterations per layer, "
        f"{args.calib_samples} calibration images, {os.cpu_count()} cores: {runs} "
        f"(target < {TARGET_SECONDS:.0f} s: {'met' if result['met'] else 'NOT met'})\n"
    )
    (out / "adaround_speed.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()

"""What every peer driver shares: the job it was given, its arrays, and how it answers.

A driver runs in the peer's own Python (which may be a separate virtual
environment without tinyptq), so this module needs nothing but numpy. The
orchestrator (``benchmarks/peers.py``) writes a job JSON and runs
``python <driver>.py <job.json>``; the driver quantizes the model with its
tool, runs the quantized model on ``eval_x`` and answers with

- ``<out>/scores.npy``: the quantized model's outputs on ``eval_x`` (float32);
- ``<out>/result.json``: ``quantize_seconds`` (the tool's PTQ alone, without
  loading or evaluation), ``peak_rss_mb`` (the process's peak resident
  memory, evaluation included) and free-form facts (``notes``, ``config``), or
  ``{"unsupported": reason}`` when the tool cannot do the setting.

The orchestrator computes every metric itself, from the scores, with the same
labels and code for every tool.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


class Job:
    """One (tool, method, bit setting) run on one use case."""

    def __init__(self, path: str | Path) -> None:
        self.spec: dict[str, Any] = json.loads(Path(path).read_text())
        self.out = Path(self.spec["out"])
        self.out.mkdir(parents=True, exist_ok=True)
        self.method: str = self.spec["method"]
        self.weight_bits: int = int(self.spec["weight_bits"])
        self.act_bits: int = int(self.spec["act_bits"])
        self.seed: int = int(self.spec.get("seed", 0))
        self.options: dict[str, Any] = dict(self.spec.get("options", {}))
        self.model_h5: str = self.spec["model_h5"]  # Keras (tf_keras / Keras 2) model file
        self.model_onnx: str = self.spec["model_onnx"]  # float ONNX (tf2onnx, NHWC input)
        self._started = 0.0

    def calibration(self) -> np.ndarray:
        """The calibration inputs, the same samples for every tool (float32)."""
        return np.load(self.spec["calib"]).astype(np.float32)

    def eval_inputs(self) -> np.ndarray:
        """The evaluation inputs (float32); labels stay with the orchestrator."""
        return np.load(self.spec["eval_x"]).astype(np.float32)

    def start(self) -> None:
        """Start the PTQ clock (call right before the tool's quantization)."""
        self._started = time.perf_counter()

    def stop(self) -> float:
        """Stop the PTQ clock; the seconds since :meth:`start`."""
        self.spec["_seconds"] = time.perf_counter() - self._started
        return self.spec["_seconds"]

    def finish(self, scores: np.ndarray, **facts: Any) -> None:
        """Write the quantized model's scores on the evaluation inputs and the run's facts."""
        np.save(self.out / "scores.npy", np.asarray(scores, dtype=np.float32))
        result = {
            "quantize_seconds": round(float(self.spec.get("_seconds", 0.0)), 3),
            "peak_rss_mb": peak_rss_mb(),
            **facts,
        }
        (self.out / "result.json").write_text(json.dumps(result, indent=2, default=str))

    def unsupported(self, reason: str) -> None:
        """Answer that the tool cannot run this setting, and exit."""
        (self.out / "result.json").write_text(json.dumps({"unsupported": reason}))
        sys.exit(0)


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (VmHWM), MB; None where /proc is missing.

    Read here rather than from the parent's rusage: Linux carries the parent's
    high-water mark into a child's rusage across fork and exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def batched(fn: Callable[[np.ndarray], Any], x: np.ndarray, batch: int = 64) -> np.ndarray:
    """``fn`` applied to ``x`` in batches, outputs concatenated."""
    return np.concatenate([np.asarray(fn(x[i : i + batch])) for i in range(0, len(x), batch)])


def main(run: Callable[[Job], None]) -> None:
    """Entry point of a driver: ``python driver.py job.json``."""
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} JOB.json")
    run(Job(sys.argv[1]))

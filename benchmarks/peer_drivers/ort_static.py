"""onnxruntime's ``quantize_static``: QDQ, per-channel weights, MinMax / Entropy / Percentile.

Methods are the calibration methods (``minmax``, ``entropy``, ``percentile``).
The float ONNX model is pre-processed as onnxruntime recommends
(``quant_pre_process``: shape inference and graph optimisation), then
quantized with QDQ nodes: weights per channel and symmetric (``QInt8``, or
``QInt4`` at 4 bits), activations per tensor and asymmetric (``QUInt8``, or
``QUInt4`` at 4 bits). onnxruntime has no 3-bit type. The quantized model is
run by onnxruntime on the CPU, as deployed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _job import Job, batched, main  # noqa: E402

METHODS = ("minmax", "entropy", "percentile")


def run(job: Job) -> None:
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    weight_types = {8: QuantType.QInt8, 4: QuantType.QInt4}
    act_types = {8: QuantType.QUInt8, 4: QuantType.QUInt4}
    if job.weight_bits not in weight_types or job.act_bits not in act_types:
        job.unsupported(f"no {job.weight_bits}-bit weight / {job.act_bits}-bit activation type (int8, int4 only)")
    if job.method not in METHODS:
        raise SystemExit(f"unknown method {job.method!r}; valid: {', '.join(METHODS)}")
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[job.method]
    calib = job.calibration()
    input_name = ort.InferenceSession(job.model_onnx, providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{input_name: calib[i : i + 32]} for i in range(0, len(calib), 32)])

        def get_next(self):
            return next(self.batches, None)

    prepped = job.out / "prepped.onnx"
    quantized = job.out / "quantized.onnx"
    job.start()
    quant_pre_process(job.model_onnx, str(prepped))
    try:
        quantize_static(
            str(prepped),
            str(quantized),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=act_types[job.act_bits],
            weight_type=weight_types[job.weight_bits],
            calibrate_method=method,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
    except Exception as exc:  # the quantizer's own refusal of a type combination
        job.unsupported(f"quantize_static refused: {str(exc).splitlines()[0][:160]}")
    job.stop()
    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = len(os.sched_getaffinity(0))  # the cores this run was given
        session = ort.InferenceSession(str(quantized), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime cannot load what its quantizer wrote
        job.unsupported(f"onnxruntime cannot run the quantized model: {str(exc).splitlines()[0][:160]}")
    scores = batched(lambda x: session.run(None, {input_name: x})[0], job.eval_inputs())
    job.finish(
        scores,
        config={
            "format": "QDQ",
            "per_channel": True,
            "weight_type": weight_types[job.weight_bits].name,
            "activation_type": act_types[job.act_bits].name,
            "calibrate_method": method.name,
            "calibration_samples": len(calib),
        },
        notes=["quant_pre_process first; the time includes it"],
    )


if __name__ == "__main__":
    main(run)

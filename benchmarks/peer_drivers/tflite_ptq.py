"""The TFLite converter's full-integer post-training quantization, run in the TFLite interpreter.

One method, ``int8``: ``TFLiteConverter.from_keras_model`` with the default
optimisation, the calibration samples as representative dataset and
``TFLITE_BUILTINS_INT8`` ops (per-channel int8 weights, per-tensor int8
activations, int32 biases), float input and output so that the model input is
quantized by the model's own first op. The converter's public PTQ has no
weight or activation width below 8 bits, so every other setting is answered
as unsupported. Scores come from ``tf.lite.Interpreter`` (its default CPU
kernels), one sample at a time, as a device would run it.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _job import Job, main  # noqa: E402


def run(job: Job) -> None:
    if (job.weight_bits, job.act_bits) != (8, 8):
        job.unsupported("the converter's post-training quantization has int8 (and 16x8) only")
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf
    import tf_keras

    tf.random.set_seed(job.seed)
    model = tf_keras.models.load_model(job.model_h5, compile=False)
    calib = job.calibration()

    def representative():
        for i in range(len(calib)):
            yield [calib[i : i + 1]]

    job.start()
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    flatbuffer = converter.convert()
    job.stop()
    (job.out / "model_int8.tflite").write_bytes(flatbuffer)
    with warnings.catch_warnings():  # the interpreter announces its move to LiteRT
        warnings.simplefilter("ignore")
        interp = tf.lite.Interpreter(model_content=flatbuffer)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    scores = []
    for x in job.eval_inputs():
        interp.set_tensor(inp["index"], x[None])
        interp.invoke()
        scores.append(interp.get_tensor(out["index"])[0])
    job.finish(
        np.stack(scores),
        config={
            "ops": "TFLITE_BUILTINS_INT8",
            "io": "float32",
            "representative_samples": len(calib),
            "bytes": len(flatbuffer),
        },
    )


if __name__ == "__main__":
    main(run)

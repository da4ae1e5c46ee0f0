"""Running deployed files in the runtimes that execute them on devices.

- ``tflm``: TensorFlow Lite Micro's own interpreter (the ``tflite-micro``
  package), the runtime of microcontrollers; one sample at a time, as on a
  device.
- ``tflite``: ``tf.lite.Interpreter`` as shipped (its default XNNPACK delegate
  runs the int8 operators with its own arithmetic).
- ``tflite-ref``: ``tf.lite.Interpreter`` with TFLite's reference kernels.

A model with int8 input takes float data quantized the way TFLite's QUANTIZE
operator does (halves away from zero); an int8 output is dequantized. The
``raw`` variants return the output tensor as the runtime stores it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from tinyptq.errors import ConfigError, ModelError, first_line
from tinyptq.fixedpoint import tflite_round

RUNTIMES = ("tflm", "tflite", "tflite-ref")


def _read(model: bytes | str | Path) -> bytes:
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    path = Path(model)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    data = path.read_bytes()
    if data[4:8] != b"TFL3":
        raise ModelError(f"model file {path} is not a .tflite flatbuffer (no TFL3 identifier)")
    return data


def _quant_params(details: dict) -> tuple[float, int] | None:
    """(scale, zero point) of an integer tensor, None for float tensors."""
    if np.dtype(details["dtype"]).kind == "f":
        return None
    q = details.get("quantization_parameters") or {}
    scales = np.asarray(q.get("scales", []), np.float32)
    zps = np.asarray(q.get("zero_points", []), np.int64)
    if scales.size != 1:
        raise ModelError(f"model input/output of type {np.dtype(details['dtype']).name} has no per-tensor scale")
    return float(scales[0]), int(zps[0])


def quantize_input(x: np.ndarray, details: dict) -> np.ndarray:
    """Float data as the model's input tensor holds it (TFLite's QUANTIZE rounding for integer inputs)."""
    params = _quant_params(details)
    dtype = np.dtype(details["dtype"])
    if params is None:
        return np.asarray(x, dtype)
    scale, zp = params
    q = tflite_round(np.asarray(x, np.float32) / np.float32(scale)) + zp
    info = np.iinfo(dtype)
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize_output(y: np.ndarray, details: dict) -> np.ndarray:
    """An output tensor as float32 (integer outputs: (q - zero point) * scale)."""
    params = _quant_params(details)
    if params is None:
        return np.asarray(y, np.float32)
    scale, zp = params
    return ((y.astype(np.int64) - zp).astype(np.float32) * np.float32(scale)).astype(np.float32)


class _Runner:
    """One loaded interpreter: details of input 0 / output 0 and a per-sample invoke."""

    def __init__(self, runtime: str, data: bytes) -> None:
        if runtime not in RUNTIMES:
            raise ConfigError(f"unknown runtime '{runtime}' (valid: {', '.join(RUNTIMES)})")
        self.runtime = runtime
        try:
            self._load(data)
        except Exception as exc:  # the interpreters raise their own (or struct / flatbuffer) errors
            raise ModelError(f"{runtime} cannot load the model: {first_line(exc, 200)}") from None

    def _load(self, data: bytes) -> None:
        if self.runtime == "tflm":
            from tflite_micro.python.tflite_micro import runtime as tflm

            self.interp = tflm.Interpreter.from_bytes(data)
            self.input, self.output = self.interp.get_input_details(0), self.interp.get_output_details(0)
            self.invoke = self._invoke_tflm
            return
        from tinyptq._tf import tf

        kwargs: dict[str, Any] = {"model_content": data}
        if self.runtime == "tflite-ref":
            kwargs["experimental_op_resolver_type"] = tf.lite.experimental.OpResolverType.BUILTIN_REF
        with warnings.catch_warnings():  # tf.lite.Interpreter announces its move to LiteRT
            warnings.simplefilter("ignore")
            self.interp = tf.lite.Interpreter(**kwargs)
        self.interp.allocate_tensors()
        self.input, self.output = self.interp.get_input_details()[0], self.interp.get_output_details()[0]
        self.invoke = self._invoke_tflite

    def _invoke_tflm(self, x: np.ndarray) -> np.ndarray:
        self.interp.set_input(x, 0)
        self.interp.invoke()
        return np.array(self.interp.get_output(0))

    def _invoke_tflite(self, x: np.ndarray) -> np.ndarray:
        self.interp.set_tensor(self.input["index"], x)
        self.interp.invoke()
        return self.interp.get_tensor(self.output["index"]).copy()

    def check_input(self, x: np.ndarray) -> None:
        want = tuple(int(d) for d in self.input["shape"][1:])
        if tuple(x.shape[1:]) != want:
            raise ModelError(f"the model takes inputs of shape {want}, the data has {tuple(x.shape[1:])}")


def run_raw(
    model: bytes | str | Path, x: np.ndarray, runtime: str = "tflm", progress: bool = False
) -> tuple[np.ndarray, dict]:
    """Outputs of a .tflite model over ``x``, one sample per invoke, as stored; and the output's details."""
    runner = _Runner(runtime, _read(model))
    x = np.asarray(x)
    runner.check_input(x)
    make = tqdm if progress else (lambda it, **_: it)
    outs = [runner.invoke(quantize_input(x[i : i + 1], runner.input)) for i in make(range(len(x)), desc=runtime)]
    return np.concatenate(outs, axis=0), runner.output


def run(model: bytes | str | Path, x: np.ndarray, runtime: str = "tflm", progress: bool = False) -> np.ndarray:
    """Float outputs of a .tflite model over ``x`` in ``runtime`` (integer outputs dequantized)."""
    raw, details = run_raw(model, x, runtime, progress)
    return dequantize_output(raw, details)


def predictor(model: bytes | str | Path, runtime: str = "tflm") -> Callable[[np.ndarray], np.ndarray]:
    """``x -> float outputs`` for a .tflite model in ``runtime``."""
    data = _read(model)
    return lambda x: run(data, x, runtime)

"""Reading a .tflite's quantization back and comparing it with a state's encodings.

Activations are found by name (the converter names tensors after the Keras
layer that produced them, or after our FakeQuant) and, for the model input, by
data flow; kernels are the weight inputs of CONV_2D / DEPTHWISE_CONV_2D /
FULLY_CONNECTED ops, compared integer by integer (INT4 kernels unpacked from
the flatbuffer itself, not through tf.lite.Interpreter).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tinyptq.export.tflite import ACT_PREFIX, KERNEL_OPS, interpreter, owner, tflite_kernel_layout
from tinyptq.export.tflite_int4 import read_int4_tensors


@dataclass(frozen=True)
class TensorParams:
    """A TFLite tensor's quantization as read back from the file."""

    name: str
    dtype: str
    scales: np.ndarray
    zero_points: np.ndarray
    axis: int


def read_tensor_params(model: bytes | str | Path) -> list[TensorParams]:
    """Every quantized tensor of a .tflite file with its scales and zero points (dtype 'int4' if packed)."""
    interp = interpreter(model)
    int4 = read_int4_tensors(model)
    out = []
    for d in interp.get_tensor_details():
        q = d["quantization_parameters"]
        if len(q["scales"]) == 0:
            continue
        out.append(
            TensorParams(d["name"], "int4" if d["name"] in int4 else np.dtype(d["dtype"]).name,
                         np.asarray(q["scales"], np.float32),
                         np.asarray(q["zero_points"], np.int64), int(q["quantized_dimension"]))
        )
    return out


@dataclass
class TfliteCheck:
    """Which TFLite tensor holds each of our encodings, and every disagreement found."""

    activations: dict[str, str]  # activation point -> TFLite tensor with its scale / zero point
    kernels: dict[str, str]  # layer -> TFLite kernel tensor
    problems: list[str]

    @property
    def ok(self) -> bool:
        """Whether every encoding was found in the file, unchanged."""
        return not self.problems


def check_tflite(state: Any, model: bytes | str | Path) -> TfliteCheck:
    """Read the .tflite's quantization parameters back and compare them with ``state``'s encodings.

    Activations: some int8 tensor named after the point carries its scale and
    zero point (uint8 grids moved by -128). Kernels: the kernel input of each
    CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED op holds the layer's integers,
    scales and zero points 0, as int8 or as INT4.
    """
    interp = interpreter(model)
    interp.allocate_tensors()
    details = {d["index"]: d for d in interp.get_tensor_details()}
    problems: list[str] = []
    acts: dict[str, str] = {}
    by_owner: dict[str, list[dict]] = {}
    for d in details.values():
        q = d["quantization_parameters"]
        if np.dtype(d["dtype"]) == np.int8 and len(q["scales"]) == 1:
            name = owner(d["name"]) or ""
            by_owner.setdefault(name.removeprefix(ACT_PREFIX), []).append(d)
    # the input's QUANTIZE output may be named 'tfl.quantize': find it by data flow instead
    model_inputs = {int(d["index"]) for d in interp.get_input_details()}
    for op in interp._get_ops_details():
        if op["op_name"] == "QUANTIZE" and int(op["inputs"][0]) in model_inputs:
            for p in state.graph.act_points():
                if p.is_input:
                    by_owner.setdefault(p.name, []).append(details[int(op["outputs"][0])])
    for point, enc in state.act_encodings.items():
        zp = int(enc.zero_point) - (0 if enc.signed else 128)
        found = by_owner.get(point, [])
        hit = [
            d for d in found
            if int(d["quantization_parameters"]["zero_points"][0]) == zp
            and np.isclose(d["quantization_parameters"]["scales"][0], enc.scale, rtol=1e-6, atol=0)
        ]
        if hit:
            acts[point] = hit[-1]["name"]
            continue
        got = [(float(d["quantization_parameters"]["scales"][0]), int(d["quantization_parameters"]["zero_points"][0])) for d in found]
        problems.append(f"activation '{point}': expected scale {float(enc.scale):.6g} zero point {zp}, found {got or 'no tensor'}")
    kernels = _check_kernels(state, interp, details, read_int4_tensors(model), problems)
    return TfliteCheck(acts, kernels, problems)


def _check_kernels(
    state: Any, interp: Any, details: dict, int4: dict[str, np.ndarray], problems: list[str]
) -> dict[str, str]:
    ints = state.integer_kernels()
    kernels: dict[str, str] = {}
    for op in interp._get_ops_details():  # the only way to see which tensor is an op's kernel
        if op["op_name"] not in KERNEL_OPS:
            continue
        d = details[int(op["inputs"][1])]
        layer = owner(d["name"])
        if layer not in ints:
            problems.append(f"kernel tensor '{d['name']}' belongs to no quantized layer")
            continue
        kernels[layer] = d["name"]
        enc = state.weight_encodings[layer]
        q = d["quantization_parameters"]
        values = int4[d["name"]] if d["name"] in int4 else interp.get_tensor(d["index"])
        expected = tflite_kernel_layout(ints[layer], op["op_name"])
        scales = np.broadcast_to(enc.scale, q["scales"].shape) if enc.per_channel else enc.scale.reshape(1)
        if values.shape != expected.shape or not np.array_equal(values, expected):
            problems.append(f"kernel of '{layer}': integers differ from tinyptq's")
        if q["scales"].shape != scales.shape or not np.allclose(q["scales"], scales, rtol=1e-6, atol=0):
            problems.append(f"kernel of '{layer}': scales differ from tinyptq's")
        if np.any(q["zero_points"] != 0):
            problems.append(f"kernel of '{layer}': non-zero zero points")
    for layer in sorted(set(ints) - set(kernels)):
        problems.append(f"kernel of '{layer}' not found in the TFLite file")
    return kernels

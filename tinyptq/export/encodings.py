"""encodings.json: every quantized tensor's grid, enough to rebuild the quantization elsewhere.

Layout (format version 1)::

    {"format": "tinyptq-encodings", "format_version": 1, "tinyptq_version": "0.1.0",
     "model": "resnet8", "quant_config": {...QuantConfig.to_dict()...},
     "activations": {"conv2d_2": {"bits": 8, "dtype": "uint8", "scale": 0.1, "zero_point": 138,
                                  "symmetric": false, "signed": false, "narrow_range": false,
                                  "axis": null, "qmin": 0, "qmax": 255, "min": -13.8, "max": 12.1,
                                  "onnx_tensor": "conv2d_2"}, ...},
     "weights": {"conv2d": {"kind": "conv", "bits": 4, "dtype": "int4", "scale": [...], "zero_point": [...],
                            ..., "axis": 3, "onnx": {"initializer": "conv2d/kernel", "axis": 0}}, ...}}

``q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)`` and
``x_hat = (q - zero_point) * scale``. ``zero_point`` is the offset added to the
rounded value (AIMET's ``offset`` is its negative). ``axis`` is the channel
axis of a per-channel encoding in the graph's kernel layout (Keras: HWIO,
depthwise HWC1, dense IO); ``onnx.axis`` is the same axis in the exported QDQ
model. ``dtype`` names the grid (``int4`` = signed 4-bit), not a container.
Kernels chosen by a rounding stage are integers, not encodings: they live in
the QDQ ONNX / TFLite files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinyptq import __version__
from tinyptq.config import QuantConfig
from tinyptq.errors import ConfigError, first_line
from tinyptq.graph.base import OnnxView
from tinyptq.quant import Encoding

FORMAT = "tinyptq-encodings"
FORMAT_VERSION = 1


@dataclass
class EncodingsFile:
    """The contents of an encodings.json, as Encodings again."""

    weights: dict[str, Encoding]
    activations: dict[str, Encoding]
    quant_config: QuantConfig
    tinyptq_version: str
    data: dict[str, Any]  # the raw JSON (ONNX names, kinds, ...)


def encoding_entry(enc: Encoding) -> dict[str, Any]:
    """One tensor's grid as plain JSON data."""
    d = enc.to_dict()
    d["dtype"] = f"{'int' if enc.signed else 'uint'}{enc.bits}"
    d["min"] = enc.min.tolist()
    d["max"] = enc.max.tolist()
    return d


def encodings_dict(state: Any, view: OnnxView | None = None) -> dict[str, Any]:
    """The encodings.json contents of a PTQState (ONNX names added when ``view`` is given)."""
    acts: dict[str, Any] = {}
    for point, enc in state.act_encodings.items():
        entry = encoding_entry(enc)
        if view is not None and point in view.tensors:
            entry["onnx_tensor"] = view.tensors[point]
        acts[point] = entry
    kinds = {layer.name: layer.kind for layer in state.graph.quant_layers()}
    weights: dict[str, Any] = {}
    for layer, enc in state.weight_encodings.items():
        entry = {"kind": kinds.get(layer), **encoding_entry(enc)}
        if view is not None and layer in view.kernels:
            perm = tuple(view.kernel_perms[layer])
            axis = perm.index(enc.axis % len(perm)) if enc.per_channel else None
            entry["onnx"] = {"initializer": view.kernels[layer], "axis": axis}
        entry["fixed_by_rounding_stage"] = layer in state.fixed_weights
        weights[layer] = entry
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tinyptq_version": __version__,
        "model": getattr(state.graph, "name", None),
        "quant_config": state.config.to_dict(),
        "activations": acts,
        "weights": weights,
    }


def write_encodings(state: Any, path: str | Path, view: OnnxView | None = None) -> Path:
    """Write encodings.json for ``state``; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(encodings_dict(state, view), indent=2))
    tmp.replace(path)
    return path


def load_encodings(path: str | Path) -> EncodingsFile:
    """Read an encodings.json back into Encodings (ConfigError when it is not one)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read encodings file {path}: {first_line(exc, 120)}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a tinyptq encodings file (no 'format: {FORMAT}')")
    if int(data.get("format_version", 0)) > FORMAT_VERSION:
        raise ConfigError(f"{path} has encodings format {data['format_version']}; this tinyptq reads {FORMAT_VERSION}")
    try:
        weights = {k: Encoding.from_dict(v) for k, v in data["weights"].items()}
        acts = {k: Encoding.from_dict(v) for k, v in data["activations"].items()}
        config = QuantConfig.from_dict(data.get("quant_config"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"malformed encodings file {path}: {type(exc).__name__} {exc}") from None
    return EncodingsFile(weights, acts, config, str(data.get("tinyptq_version")), data)

"""Exporters of a quantized PTQState: QDQ ONNX, TFLite, encodings JSON.

They read the graph and the state's encodings only; no exporter recomputes a
range or re-rounds a weight. ``export_state`` writes the chosen formats into
one directory under fixed names (``model.qdq.onnx``, ``model.tflite``,
``encodings.json``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tinyptq.errors import ConfigError

FORMATS = ("onnx", "tflite", "encodings")
FILE_NAMES = {"onnx": "model.qdq.onnx", "tflite": "model.tflite", "encodings": "encodings.json"}


def parse_formats(formats: str | Iterable[str]) -> list[str]:
    """Export format names from 'onnx,tflite' or a list; ConfigError naming the valid ones."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out: list[str] = []
    for item in (i.strip().lower() for i in items):
        if not item:
            continue
        if item not in FORMATS:
            raise ConfigError(f"unknown export format '{item}'; valid formats: {', '.join(FORMATS)}")
        if item not in out:
            out.append(item)
    if not out:
        raise ConfigError(f"no export format given; valid formats: {', '.join(FORMATS)}")
    return out


def export_state(state: Any, out_dir: str | Path, formats: str | Iterable[str]) -> dict[str, Path]:
    """Write the chosen formats of ``state`` into ``out_dir``; return format -> path.

    Every format is checked before anything is written (e.g. TFLite needs 8 bits).
    """
    formats = parse_formats(formats)
    if "tflite" in formats:
        from tinyptq.export.tflite import check_exportable

        check_exportable(state)
    out = Path(out_dir)
    written: dict[str, Path] = {}
    view = None
    if "onnx" in formats or "encodings" in formats:
        from tinyptq.export.qdq_onnx import onnx_view, required_opset

        # one float view serves both: the QDQ model and the ONNX names in encodings.json
        view = onnx_view(state.graph, required_opset(state), optional="onnx" not in formats)
    for fmt in formats:
        path = out / FILE_NAMES[fmt]
        if fmt == "onnx":
            from tinyptq.export.qdq_onnx import export_qdq

            written[fmt] = export_qdq(state, path, view=view)
        elif fmt == "tflite":
            from tinyptq.export.tflite import export_tflite

            written[fmt] = export_tflite(state, path)
        else:
            from tinyptq.export.encodings import write_encodings

            written[fmt] = write_encodings(state, path, view)
    return written


__all__ = ["FILE_NAMES", "FORMATS", "export_state", "parse_formats"]

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
from tinyptq.paths import prepare_out_dir, write_error

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

    Every format, and that ``out_dir`` can be written, is checked before
    anything is converted (e.g. TFLite needs 8 bits).
    """
    formats = parse_formats(formats)
    if "tflite" in formats:
        from tinyptq.export.tflite import check_exportable

        check_exportable(state)
    out = prepare_out_dir(out_dir, "export directory")
    written: dict[str, Path] = {}
    view = None
    if "onnx" in formats or "encodings" in formats:
        from tinyptq.export.qdq_onnx import onnx_view, required_opset

        # one float view serves both: the QDQ model and the ONNX names in encodings.json
        view = onnx_view(state.graph, required_opset(state), optional="onnx" not in formats)
    for fmt in formats:
        path = out / FILE_NAMES[fmt]
        try:
            written[fmt] = _write(fmt, state, path, view)
        except OSError as exc:  # e.g. the disk filled up meanwhile
            raise write_error(path, exc) from None
    return written


def _write(fmt: str, state: Any, path: Path, view: Any) -> Path:
    """Write one format to ``path``."""
    if fmt == "onnx":
        from tinyptq.export.qdq_onnx import export_qdq

        return export_qdq(state, path, view=view)
    if fmt == "tflite":
        from tinyptq.export.tflite import export_tflite

        return export_tflite(state, path)
    from tinyptq.export.encodings import write_encodings

    return write_encodings(state, path, view)


__all__ = ["FILE_NAMES", "FORMATS", "export_state", "parse_formats"]

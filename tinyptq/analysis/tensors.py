"""Per tensor: how well each activation point and kernel fits its grid (SQNR, range, clipping, histograms).

Activation statistics are taken on calibration samples from the float model
(as it was before any stage quantized it)
(the tensor against its own quantization: ``sqnr_db``), and from the fully
quantized simulation (the value the network actually carries against float:
``sqnr_db_network``). Kernels are compared as the deployed model holds them
(with a rounding stage's choices). "Clipped" counts the values beyond the
grid's outer levels by more than half a step.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tinyptq.analysis.probe import Probe, db, nsr
from tinyptq.quant import Encoding

HISTOGRAM_BINS = 80
MAX_GRID_LEVELS = 512  # grids finer than this are not listed (the plot thins them further)


def _clipped(x: np.ndarray, enc: Encoding, axis: int | None = None) -> float:
    lo, hi, step = enc.min, enc.max, enc.scale
    if enc.per_channel and axis is not None:
        shape = [1] * x.ndim
        shape[axis % x.ndim] = -1
        lo, hi, step = lo.reshape(shape), hi.reshape(shape), step.reshape(shape)
    return float(np.mean((x < lo - step / 2) | (x > hi + step / 2)))


def _channels(x: np.ndarray, axis: int) -> np.ndarray:
    """``x`` as (channels, values) along ``axis``."""
    axis %= x.ndim
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def _range(enc: Encoding) -> list[float]:
    return [float(np.min(enc.min)), float(np.max(enc.max))]


def activation_stats(probe: Probe, x: np.ndarray) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """One row per quantized activation point (network order), and the float values for histograms."""
    state = probe.state
    owners = {p.name: p.owner for p in state.graph.act_points()}
    names = [p for u in probe.units for p in u.points]
    floats = probe.float_graph.run(x, names)
    probe.all_but(())
    quantized = probe.sim.run(x, outputs=names)
    rows = []
    for name in names:
        v, enc = floats[name], state.act_encodings[name]
        rows.append({
            "name": name,
            "owner": owners.get(name),
            "bits": enc.bits,
            "range": _range(enc),
            "observed": [float(v.min()), float(v.max())],
            "clipped": _clipped(v, enc),
            "sqnr_db": db(nsr(v, enc.fake_quant(v))),
            "sqnr_db_network": db(nsr(v, quantized[name])),
        })
    return rows, floats


def kernel_stats(probe: Probe) -> list[dict[str, Any]]:
    """One row per quantized kernel (network order): SQNR of the deployed kernel, range, clipping, worst channel."""
    state = probe.state
    deployed = state.quantized_kernels()
    rows = []
    for unit in probe.units:
        if not unit.layer:
            continue
        w, enc = state.graph.kernel(unit.layer), state.weight_encodings[unit.layer]
        q = deployed[unit.layer]
        worst = None
        if enc.per_channel:
            per = [nsr(a, b) for a, b in zip(_channels(w, enc.axis), _channels(q, enc.axis), strict=True)]
            worst = int(np.argmax(per))
        rows.append({
            "name": unit.layer,
            "bits": enc.bits,
            "per_channel": bool(enc.per_channel),
            "range": _range(enc),
            "observed": [float(w.min()), float(w.max())],
            "clipped": _clipped(w, enc, enc.axis),
            "sqnr_db": db(nsr(w, q)),
            "worst_channel": worst,
        })
    return rows


def histograms(
    probe: Probe, acts: list[dict], kernels: list[dict], floats: dict[str, np.ndarray], worst: int = 3
) -> list[dict[str, Any]]:
    """Histograms with their grids for the ``worst`` activation points and kernels by SQNR, worst first."""
    def key(row: dict) -> float:
        return float("inf") if row["sqnr_db"] is None else row["sqnr_db"]

    out = []
    for row in sorted(acts, key=key)[:worst]:
        enc = probe.state.act_encodings[row["name"]]
        out.append(_histogram(row["name"], "activation", None, floats[row["name"]], enc, row["sqnr_db"]))
    deployed = probe.state.quantized_kernels()
    for row in sorted(kernels, key=key)[:worst]:
        name, channel = row["name"], row["worst_channel"]
        w, q, enc = probe.state.graph.kernel(name), deployed[name], probe.state.weight_encodings[name]
        if channel is not None:  # that channel's values on its own grid
            axis = enc.axis % w.ndim
            w, q = np.take(w, channel, axis=axis), np.take(q, channel, axis=axis)
            enc = Encoding(enc.bits, enc.scale[channel], enc.zero_point[channel], enc.signed, enc.symmetric,
                           enc.narrow_range)
        out.append(_histogram(name, "kernel", channel, w, enc, db(nsr(w, q))))
    return out


def _histogram(name: str, kind: str, channel: int | None, v: np.ndarray, enc: Encoding, sqnr: float | None) -> dict:
    lo, hi = float(enc.min), float(enc.max)
    span = (min(float(v.min()), lo), max(float(v.max()), hi))
    counts, edges = np.histogram(v.ravel(), bins=HISTOGRAM_BINS, range=span if span[1] > span[0] else None)
    levels = enc.qmax - enc.qmin + 1
    grid = [] if levels > MAX_GRID_LEVELS else (np.arange(enc.qmin, enc.qmax + 1) - int(enc.zero_point)) * float(enc.scale)
    return {
        "tensor": name,
        "kind": kind,
        "channel": channel,
        "bits": enc.bits,
        "bin_edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
        "grid": [float(g) for g in grid],
        "range": [lo, hi],
        "sqnr_db": sqnr,
    }

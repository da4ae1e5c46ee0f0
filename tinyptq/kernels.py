"""Per-channel maths on kernels in the canonical layout, shared by the stages.

Kernels here are in the layout ``(out, in // groups, *taps)`` of
tinyptq.graph.base.KernelLayout (a dense kernel is ``(out, in)``): one set of
formulas serves every backend, and the stages that scale or measure channels
(bn_folding, cle, bias_correction) take them from this module rather than from
each other.
"""

from __future__ import annotations

import numpy as np

from tinyptq.graph.base import ModelGraph


def canonical_kernel(graph: ModelGraph, layer: str) -> np.ndarray:
    """The layer's kernel in the canonical layout (float64)."""
    return graph.kernel_layout(layer).to_canonical(graph.kernel(layer).astype(np.float64))


def output_channels(kernel: np.ndarray) -> int:
    """Number of output channels of a canonical kernel."""
    return int(kernel.shape[0])


def input_channels(kernel: np.ndarray, groups: int) -> int:
    """Number of input channels of a canonical kernel."""
    return int(groups * kernel.shape[1])


def _grouped(kernel: np.ndarray, groups: int) -> np.ndarray:
    """The kernel viewed as (groups, out // groups, in // groups, taps)."""
    return kernel.reshape(groups, kernel.shape[0] // groups, kernel.shape[1], -1)


def output_ranges(kernel: np.ndarray) -> np.ndarray:
    """max |W| per output channel."""
    return np.abs(kernel).reshape(kernel.shape[0], -1).max(axis=1)


def input_ranges(kernel: np.ndarray, groups: int) -> np.ndarray:
    """max |W| per input channel."""
    return np.abs(_grouped(kernel, groups)).max(axis=(1, 3)).reshape(-1)


def scale_output_channels(kernel: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The canonical kernel with output channel c multiplied by ``scale[c]``."""
    scale = np.asarray(scale, np.float64)
    return kernel * scale.reshape(-1, *([1] * (kernel.ndim - 1)))


def scale_input_channels(kernel: np.ndarray, groups: int, scale: np.ndarray) -> np.ndarray:
    """The kernel with input channel i multiplied by ``scale[i]``."""
    s = np.asarray(scale, np.float64).reshape(groups, 1, -1, 1)
    return (_grouped(kernel, groups) * s).reshape(kernel.shape)


def constant_input_response(kernel: np.ndarray, groups: int, c: np.ndarray) -> np.ndarray:
    """The layer's output (bias excluded) for an input constant ``c`` per channel, ignoring padding."""
    taps = _grouped(kernel, groups).sum(axis=3)  # (groups, out // groups, in // groups)
    c = np.asarray(c, np.float64).reshape(groups, -1)
    return np.einsum("goi,gi->go", taps, c).reshape(-1)

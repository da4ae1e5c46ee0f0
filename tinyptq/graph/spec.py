"""LayerSpec: a quantizable layer described without its framework.

Everything the differentiable executor needs to run a Conv / DepthwiseConv /
Dense layer: the kernel in the canonical layout of ``KernelLayout``
(``(out, in // groups, *taps)``; dense ``(out, in)``), the bias, strides,
explicit paddings, dilations, groups and where the channels of the tensors it
reads and writes are (last for Keras, second for ONNX convolutions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, eq=False)
class LayerSpec:
    """A quantizable layer as the executor runs it."""

    name: str
    kind: str  # "conv" | "depthwise" | "dense"
    kernel: np.ndarray  # canonical layout, float32
    bias: np.ndarray | None  # (out,) float32, or None
    strides: tuple[int, ...] = ()  # one per spatial dimension (empty for dense)
    pads: tuple[tuple[int, int], ...] = ()  # (before, after) per spatial dimension
    dilations: tuple[int, ...] = ()
    groups: int = 1
    channels_last: bool = True  # tensor layout: NHWC (Keras) or NCHW (ONNX Conv)
    same_padding: bool = False  # pads are what TF's "SAME" computes (same bits as Keras 'same')

    @property
    def out_channels(self) -> int:
        """Number of output channels."""
        return int(self.kernel.shape[0])

    @property
    def in_channels(self) -> int:
        """Number of input channels."""
        return int(self.kernel.shape[1] * self.groups)

    @property
    def spatial_rank(self) -> int:
        """Number of spatial dimensions (0 for dense)."""
        return self.kernel.ndim - 2

    def describe(self) -> dict[str, Any]:
        """Plain data (no arrays) for logs and tests."""
        return {
            "name": self.name,
            "kind": self.kind,
            "kernel_shape": tuple(self.kernel.shape),
            "bias": self.bias is not None,
            "strides": self.strides,
            "pads": self.pads,
            "dilations": self.dilations,
            "groups": self.groups,
            "channels_last": self.channels_last,
        }


def same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """(before, after) padding of TF / Keras 'same' (and ONNX SAME_UPPER) for one dimension."""
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2

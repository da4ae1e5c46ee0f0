"""The framework-neutral view of a model that every pipeline stage works on.

A ModelGraph (Keras or ONNX) exposes the quantizable layers with their weights,
their batch-norm followers and fused activations, and the activation tensors a
deployed integer model would quantize. Stages read and write weights through
it and ask it for float forward passes; they never touch the model file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tinyptq.errors import DataError
from tinyptq.graph.spec import LayerSpec

if TYPE_CHECKING:  # blocks.py reads graphs through this module's queries
    from tinyptq.graph.blocks import Block


@dataclass(frozen=True)
class QuantLayer:
    """A layer with a weight kernel: Conv2D, DepthwiseConv2D or Dense."""

    name: str
    kind: str  # "conv" | "depthwise" | "dense"
    channel_axis: int | None  # output-channel axis of the kernel; None: per-tensor only
    input_point: str | None  # activation point that quantizes this layer's input
    output_point: str | None  # activation point after the fused chain (BN, ReLU)
    bn: str | None  # BatchNormalization directly after the layer
    activation: str | None  # fused activation after it: "relu", "relu6" or None


@dataclass
class OnnxView:
    """The graph as a float ONNX model, with where tinyptq's names live in it.

    The exporters insert QuantizeLinear/DequantizeLinear around these tensors
    and replace these initializers with integer ones, so the file they write
    quantizes exactly the points the simulation does.
    """

    model: Any  # onnx.ModelProto, float, takes the same input layout as the graph
    tensors: dict[str, str]  # activation point name -> ONNX tensor name
    kernels: dict[str, str]  # quantizable layer -> kernel initializer name
    kernel_perms: dict[str, tuple[int, ...]]  # layer -> permutation from graph kernel to ONNX layout
    biases: dict[str, str]  # quantizable layer -> bias initializer name (layers with a bias)


# Framework-neutral operation types (ModelGraph.op_type): stages reason about
# these, never about Keras class names or ONNX op types.
OP_TYPES = frozenset(
    {
        "input",  # the model input
        "conv", "depthwise", "dense",  # quantizable layers (QuantLayer.kind)
        "batch_norm",
        "relu", "relu6",  # plain ReLU, ReLU6 (clip at 0 and 6)
        "identity",  # a linear activation: passes values unchanged
        "dropout",  # inference no-op
        "flatten", "reshape", "transpose",
        "max_pool", "avg_pool", "global_avg_pool",
        "pad",  # zero (or edge) padding
        "add", "concat", "softmax",
        "other",  # anything else the adapter runs (requantized, never looked through)
    }
)


@dataclass(frozen=True)
class KernelLayout:
    """How a kernel as ``ModelGraph.kernel`` returns it maps to the canonical layout.

    The canonical layout is ``(out_channels, in_channels // groups, *taps)``
    (ONNX's Conv layout; a dense kernel is ``(out, in)``). Output channel ``o``
    belongs to group ``o // (out_channels // groups)`` and reads input channels
    ``g * (in_channels // groups) + j``; a depthwise kernel has ``groups`` equal
    to its input channels. Stages that scale channels (BN folding, CLE, bias
    correction) compute in this layout and convert back, whatever the backend.
    """

    perm: tuple[int, ...]  # transpose of the graph kernel that puts output channels first, then inputs
    groups: int = 1
    merge_first_two: bool = False  # the first two transposed axes together are the outputs (Keras depthwise)

    def to_canonical(self, kernel: np.ndarray) -> np.ndarray:
        """The kernel as ``(out, in // groups, *taps)``."""
        t = np.transpose(np.asarray(kernel), self.perm)
        if self.merge_first_two:  # (in, multiplier, taps) -> (in * multiplier, 1, taps): channel c * m + k
            t = t.reshape(t.shape[0] * t.shape[1], 1, *t.shape[2:])
        return t

    def from_canonical(self, canonical: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """Back to the graph layout of a kernel of ``shape``."""
        t = np.reshape(canonical, [shape[p] for p in self.perm])
        return np.transpose(t, np.argsort(self.perm))


@dataclass(frozen=True)
class ActPoint:
    """An activation tensor quantized in the deployed model (named by its producer)."""

    name: str
    owner: str | None  # quantizable layer whose fused output this is
    is_input: bool = False
    is_output: bool = False


class ModelGraph(ABC):
    """A model as tinyptq's stages see it: layers, weights, activation points."""

    @property
    @abstractmethod
    def input_shape(self) -> tuple[int | None, ...]:
        """The model input's shape, batch dimension first (None where free)."""

    @property
    @abstractmethod
    def output_names(self) -> list[str]:
        """Names of the model's output tensors."""

    @abstractmethod
    def quant_layers(self) -> list[QuantLayer]:
        """The quantizable layers in topological order."""

    @abstractmethod
    def act_points(self) -> list[ActPoint]:
        """The activation tensors to quantize, in topological order."""

    @abstractmethod
    def consumers(self, name: str) -> list[str]:
        """Names of the nodes that read the output of node ``name``."""

    @abstractmethod
    def bn_params(self, name: str) -> dict[str, np.ndarray]:
        """gamma, beta, mean, var (arrays) and epsilon (float) of a batch-norm node."""

    @abstractmethod
    def remove_node(self, name: str) -> None:
        """Drop a single-input node (e.g. a folded batch norm), wiring its consumers to its input."""

    @abstractmethod
    def kernel(self, layer: str) -> np.ndarray:
        """A copy of the layer's kernel (framework layout)."""

    @abstractmethod
    def bias(self, layer: str) -> np.ndarray | None:
        """A copy of the layer's bias, or None when it has none."""

    @abstractmethod
    def set_kernel(self, layer: str, kernel: np.ndarray) -> None:
        """Replace the layer's kernel (same shape)."""

    @abstractmethod
    def set_bias(self, layer: str, bias: np.ndarray) -> None:
        """Replace (or create) the layer's bias."""

    @abstractmethod
    def iterate(
        self, x: np.ndarray, outputs: Sequence[str], batch_size: int = 128
    ) -> Iterator[dict[str, np.ndarray]]:
        """Float forward pass over ``x`` in batches, yielding the named tensors per batch."""

    @abstractmethod
    def copy(self) -> ModelGraph:
        """An independent copy (weights included) that stages may modify."""

    @abstractmethod
    def param_count(self) -> int:
        """Number of parameters (all weights, quantizable or not)."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A content hash of structure and weights (for caching)."""

    def layer_macs(self) -> dict[str, int]:
        """Multiply-accumulates per quantizable layer for one input sample (for BOPs)."""
        raise NotImplementedError(f"{type(self).__name__} does not count MACs")

    def to_onnx(self, opset: int = 17) -> OnnxView:
        """The graph as it is now as a float ONNX model (see OnnxView)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be written as ONNX")

    # ------------------------------------------------ framework-neutral queries
    @abstractmethod
    def node_names(self) -> list[str]:
        """Every node (the model input first) in topological order."""

    @abstractmethod
    def op_type(self, name: str) -> str:
        """The node's operation as one of OP_TYPES (the model input is ``"input"``)."""

    @abstractmethod
    def inputs_of(self, name: str) -> list[str]:
        """Names of the nodes whose outputs node ``name`` reads (data inputs only, in order)."""

    @abstractmethod
    def batch_norm_names(self) -> list[str]:
        """Names of the batch-norm nodes still in the graph."""

    @abstractmethod
    def kernel_layout(self, layer: str) -> KernelLayout:
        """How the layer's kernel maps to the canonical (out, in // groups, *taps) layout."""

    @abstractmethod
    def tensor_channel_axis(self, name: str) -> int:
        """Channel axis of node ``name``'s output tensor: -1 (channels last) or 1 (channels first)."""

    @abstractmethod
    def layer_spec(self, name: str) -> LayerSpec:
        """The quantizable layer ``name`` as the executor runs it (canonical kernel, strides, pads...)."""

    @abstractmethod
    def node_function(self, name: str) -> Callable[[list[Any]], Any]:
        """A TF callable computing node ``name`` (not the input, not a quantizable layer) from its data inputs.

        It takes the TF tensors of ``inputs_of(name)`` in order and returns the
        output tensor, differentiably; constants (Add operands, BN parameters,
        shapes) are inside it.
        """

    # ------------------------------------------------------------ conveniences
    def check_input(self, x: np.ndarray, what: str = "input data") -> None:
        """Raise DataError when ``x`` does not fit the model input."""
        expected = self.input_shape[1:]
        got = tuple(np.shape(x)[1:])
        fits = len(got) == len(expected) and all(
            e is None or e == g for e, g in zip(expected, got, strict=True)
        )
        if not fits:
            dims = ", ".join(map(str, expected))
            raise DataError(f"{what} has shape {tuple(np.shape(x))}; the model expects (N, {dims})")

    def quant_layer(self, name: str) -> QuantLayer:
        """The quantizable layer called ``name``."""
        for layer in self.quant_layers():
            if layer.name == name:
                return layer
        raise KeyError(name)

    def blocks(self) -> list[Block]:
        """The reconstruction units (residual, separable, single layers) in topological order."""
        from tinyptq.graph.blocks import find_blocks

        return find_blocks(self)

    def run(self, x: np.ndarray, outputs: Sequence[str] | None = None, batch_size: int = 128) -> dict[str, np.ndarray]:
        """Float forward pass, all batches concatenated (small data only)."""
        outputs = list(outputs or self.output_names)
        parts: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
        for batch in self.iterate(x, outputs, batch_size):
            for o in outputs:
                parts[o].append(batch[o])
        return {o: np.concatenate(p, axis=0) for o, p in parts.items()}

    def predict(self, x: np.ndarray, batch_size: int = 128) -> np.ndarray:
        """The float model's first output."""
        return self.run(x, self.output_names[:1], batch_size)[self.output_names[0]]

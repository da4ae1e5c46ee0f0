"""QuantSim: the fake-quantized model of a PTQState, changeable in place.

It is the executor (tinyptq.executor: one TF program of the neutral graph, for
Keras and ONNX models alike) loaded with the state's kernels and encodings, so
it is exactly what the exporters write out. Quantizers, kernels and biases can
be changed without a rebuild::

    sim = QuantSim(state)
    sim.disable("conv2d_3", kind="weight")          # that layer's kernel in float
    sim.set_encoding("conv2d_3", enc, kind="weight")
    sim.enable("conv2d_3", kind="weight")
    sim.set_bias("conv2d_3", new_bias)
    y = sim.predict(x)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tinyptq.errors import ConfigError
from tinyptq.executor import ACTIVATION, WEIGHT, Executor, Quantizer
from tinyptq.pipeline import PTQState
from tinyptq.quant import Encoding


class QuantSim:
    """Fake-quantized model: kernels on their grids, activations quantized at every point."""

    def __init__(self, state: PTQState, outputs: Sequence[str] | None = None) -> None:
        if not state.act_encodings and not state.weight_encodings:
            raise ConfigError("the pipeline set no encodings: add a range_setting stage")
        self.state = state
        self.outputs = list(outputs or state.graph.output_names)
        self.executor = Executor(state.graph)
        self.load(state)

    def load(self, state: PTQState) -> None:
        """Take another state's kernels, biases, rounding and encodings, in place (no rebuild).

        The state's graph must have this simulation's structure (the same
        nodes, e.g. a later snapshot of the same pipeline); a tensor without an
        encoding runs in float.
        """
        if state.graph.node_names() != self.executor.order:
            raise ConfigError("the state's graph has other nodes than this simulation's: build a new QuantSim")
        unknown = sorted(set(state.weight_encodings) - set(self.executor.specs))
        unknown += sorted(set(state.act_encodings) - set(self.executor.act_quantizers))
        if unknown:
            raise ConfigError(f"the state has an encoding for '{unknown[0]}', which the graph does not quantize")
        self.state = state
        fixed = state.integer_kernels() if state.fixed_weights else {}
        for layer, spec in self.executor.specs.items():
            enc = state.weight_encodings.get(layer)
            if layer in fixed:  # the stored rounding, on its grid (quantizing it again is exact)
                self.executor.set_kernel(layer, enc.dequantize(fixed[layer]))
            else:
                self.executor.set_kernel(layer, state.graph.kernel(layer))
            bias = state.graph.bias(layer)
            if bias is not None:
                self.executor.set_bias(layer, bias)
            elif layer in self.executor.biases:  # an earlier state's bias (e.g. a correction) is void
                self.executor.set_bias(layer, np.zeros(spec.out_channels, np.float32))
            self._load_quantizer(layer, enc, WEIGHT)
        for point in self.executor.act_quantizers:
            self._load_quantizer(point, state.act_encodings.get(point), ACTIVATION)

    def _load_quantizer(self, name: str, enc: Encoding | None, kind: str) -> None:
        if enc is not None:
            self.set_encoding(name, enc, kind)
        self.quantizer(name, kind).enable(enc is not None)

    # -------------------------------------------------------------- running
    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Simulated (quantized) first output for ``x``."""
        return self.run(x, batch_size)[self.outputs[0]]

    def run(
        self, x: np.ndarray, batch_size: int = 256, outputs: Sequence[str] | None = None, raw: Sequence[str] = ()
    ) -> dict[str, np.ndarray]:
        """The requested tensors by name (default: the sim's outputs); ``raw`` ones before their quantizer."""
        self.state.graph.check_input(x)
        return self.executor.run(np.asarray(x, np.float32), outputs or self.outputs, batch_size, raw)

    def function(
        self, outputs: Sequence[str], inputs: Sequence[str] | None = None, raw: Sequence[str] = ()
    ) -> Callable[..., list[Any]]:
        """A differentiable TF function of a sub-graph (see ``Executor.function``)."""
        return self.executor.function(outputs, inputs, raw)

    # -------------------------------------------------------------- changes
    def quantizer(self, name: str, kind: str = ACTIVATION) -> Quantizer:
        """The quantizer of activation point ``name`` (kind "activation") or of layer ``name``'s kernel ("weight")."""
        return self.executor.quantizer(name, kind)

    def set_encoding(self, name: str, enc: Encoding, kind: str = ACTIVATION) -> None:
        """Quantize point / kernel ``name`` with ``enc`` from now on."""
        self.executor.set_encoding(name, enc, kind)

    def enable(self, name: str, kind: str = ACTIVATION) -> None:
        """Switch one quantizer on."""
        self.quantizer(name, kind).enable(True)

    def disable(self, name: str, kind: str = ACTIVATION) -> None:
        """Switch one quantizer off (that tensor in float)."""
        self.quantizer(name, kind).enable(False)

    def set_kernel(self, layer: str, kernel: np.ndarray) -> None:
        """Replace a layer's (float) kernel, in the graph's layout; its weight quantizer still applies."""
        self.executor.set_kernel(layer, kernel)

    def set_bias(self, layer: str, bias: np.ndarray) -> None:
        """Replace a layer's bias."""
        self.executor.set_bias(layer, bias)


def target_predictor(state: PTQState) -> Callable[[np.ndarray], np.ndarray]:
    """``x -> first output`` computed with the arithmetic of ``state.config.target``.

    ``qdq``: the fake-quantized simulation (what the QDQ ONNX file states, in
    float); ``tflite``: the integers TFLite Micro computes for the exported
    .tflite (tinyptq.intsim.tflite_sim); ``onnxruntime``: what onnxruntime's
    CPU kernels compute on the QDQ export after its default graph
    optimizations (tinyptq.intsim.ort_sim).
    """
    if state.config.target == "qdq":
        return QuantSim(state).predict
    if state.config.target == "tflite":
        from tinyptq.intsim.tflite_sim import TfliteSim

        sim: Any = TfliteSim(state)
    else:
        from tinyptq.intsim.ort_sim import OrtSim

        sim = OrtSim(state)
    return lambda x: (state.graph.check_input(x), sim.predict(np.asarray(x, np.float32)))[1]

"""QuantSim: the fake-quantized model of a PTQState, for evaluation and for stages.

It is built from the graph and the state's encodings only (never from the
model file), so it is exactly what the exporters write out.
"""

from __future__ import annotations

import numpy as np

from tinyptq.errors import ConfigError
from tinyptq.pipeline import PTQState


class QuantSim:
    """Fake-quantized model: kernels on their grids, activations quantized at every point."""

    def __init__(self, state: PTQState, outputs: list[str] | None = None) -> None:
        if not state.act_encodings and not state.weight_encodings:
            raise ConfigError("the pipeline set no encodings: add a range_setting stage")
        self.state = state
        self._impl = state.graph.build_sim(state.quantized_kernels(), state.act_encodings, outputs)

    @property
    def model(self):
        """The underlying framework model (a tf_keras Model for Keras graphs)."""
        return getattr(self._impl, "model", self._impl)

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Simulated (quantized) output for ``x``."""
        self.state.graph.check_input(x)
        return self._impl.predict(np.asarray(x, np.float32), batch_size)

    def run(self, x: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """The requested (quantized) tensors by name, e.g. pre-activation layer outputs."""
        self.state.graph.check_input(x)
        return self._impl.run(np.asarray(x, np.float32), batch_size)

"""Turning a KerasGraph's nodes back into runnable tf_keras models.

The float model and the fake-quantized simulation are both rebuilt from the
same node list; the simulation only differs by kernels (already on the grid)
and FakeQuant layers after each activation point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tinyptq._tf import keras, tf
from tinyptq.quant import Encoding, fake_quant_tf

MERGE_LAYERS = {"Add", "Concatenate", "Multiply", "Subtract", "Average", "Maximum", "Minimum"}


@dataclass
class Node:
    """One layer call in the graph: its class, config, weights and input nodes."""

    name: str
    class_name: str
    config: dict[str, Any]
    inputs: list[str]
    weights: list[np.ndarray] = field(default_factory=list)


@keras.utils.register_keras_serializable(package="tinyptq")
class FakeQuant(keras.layers.Layer):
    """Fake-quantizes its input with a fixed encoding (tinyptq's shared core)."""

    def __init__(self, encoding: dict, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.encoding_dict = encoding
        self._enc = Encoding.from_dict(encoding)

    def call(self, inputs: Any) -> Any:
        """Quantize-dequantize with half-to-even rounding and the STE gradient."""
        scale, zp = self._enc.tf_params(len(inputs.shape))
        return fake_quant_tf(inputs, scale, zp, self._enc.qmin, self._enc.qmax)

    def get_config(self) -> dict:
        """Serializable config (the encoding as plain data)."""
        return {**super().get_config(), "encoding": self.encoding_dict}


def build_keras_model(
    nodes: Sequence[Node],
    outputs: Sequence[str],
    weights: dict[str, list[np.ndarray]] | None = None,
    act_encodings: dict[str, Encoding] | None = None,
    name: str = "tinyptq_model",
) -> Any:
    """A tf_keras functional model of ``nodes`` with the given outputs.

    ``weights`` replaces the weight lists of some nodes; ``act_encodings`` puts
    a FakeQuant layer after each named node.
    """
    weights = weights or {}
    act_encodings = act_encodings or {}
    tensors: dict[str, Any] = {}
    inputs = []
    for node in nodes:
        if node.class_name == "InputLayer":
            shape = node.config["batch_input_shape"][1:]
            t = keras.Input(shape=shape, dtype=node.config.get("dtype", "float32"), name=node.name)
            inputs.append(t)
        else:
            layer = keras.layers.deserialize(
                {"class_name": node.class_name, "config": dict(node.config)}
            )
            args = [tensors[i] for i in node.inputs]
            t = layer(args if node.class_name in MERGE_LAYERS else args[0])
            w = weights.get(node.name, node.weights)
            if w:
                layer.set_weights(w)
        if node.name in act_encodings:
            enc = act_encodings[node.name]
            t = FakeQuant(enc.to_dict(), name=f"{node.name}__fq")(t)
        tensors[node.name] = t
    return keras.Model(inputs, [tensors[o] for o in outputs], name=name)


class KerasSim:
    """A fake-quantized tf_keras model: ``predict`` / ``run`` evaluate it in batches."""

    def __init__(self, model: Any, output_names: Sequence[str]) -> None:
        self.model = model
        self.output_names = list(output_names)

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """The simulated model's first output for ``x``."""
        return predict_batches(self.model, x, batch_size)[0]

    def run(self, x: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """All requested outputs by name."""
        return dict(zip(self.output_names, predict_batches(self.model, x, batch_size), strict=True))


def predict_batches(model: Any, x: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """All outputs of ``model`` over ``x``, computed batch by batch (graph mode)."""
    parts: list[list[np.ndarray]] = [[] for _ in model.outputs]
    for batch in iter_batches(model, x, batch_size):
        for i, b in enumerate(batch):
            parts[i].append(b)
    return [np.concatenate(p, axis=0) for p in parts]


def iter_batches(model: Any, x: np.ndarray, batch_size: int):
    """Yield the list of outputs of ``model`` for each batch of ``x``."""
    fn = _compiled_call(model)
    for start in range(0, len(x), batch_size):
        out = fn(tf.constant(x[start : start + batch_size], tf.float32))
        yield [o.numpy() for o in out]


def _compiled_call(model: Any):
    fn = getattr(model, "_tinyptq_call", None)
    if fn is None:

        @tf.function(reduce_retracing=True)
        def fn(batch):
            out = model(batch, training=False)
            return out if isinstance(out, (list, tuple)) else [out]

        model._tinyptq_call = fn
    return fn

"""Turning a KerasGraph's nodes back into runnable float tf_keras models.

The fake-quantized simulation is not a Keras model: it is the executor
(tinyptq.executor), which runs the non-layer nodes through these layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tinyptq._tf import keras, tf

MERGE_LAYERS = {"Add", "Concatenate", "Multiply", "Subtract", "Average", "Maximum", "Minimum"}


@dataclass
class Node:
    """One layer call in the graph: its class, config, weights and input nodes."""

    name: str
    class_name: str
    config: dict[str, Any]
    inputs: list[str]
    weights: list[np.ndarray] = field(default_factory=list)


def build_keras_model(nodes: Sequence[Node], outputs: Sequence[str], name: str = "tinyptq_model") -> Any:
    """A float tf_keras functional model of ``nodes`` with the given outputs."""
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
            if node.weights:
                layer.set_weights(node.weights)
        tensors[node.name] = t
    return keras.Model(inputs, [tensors[o] for o in outputs], name=name)


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

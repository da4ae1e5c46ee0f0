"""Fisher-diagonal weights of a unit's output error (BRECQ), label free."""

from __future__ import annotations

import numpy as np

from tinyptq._tf import tf
from tinyptq.executor import Executor
from tinyptq.graph.base import ModelGraph
from tinyptq.rounding.units import Unit

EVAL_BATCH = 256


def logits_node(graph: ModelGraph) -> str:
    """The node holding the model's logits: its first output, or the input of a final softmax."""
    out = graph.output_names[0]
    return graph.inputs_of(out)[0] if graph.op_type(out) == "softmax" else out


def fisher_weights(ex: Executor, unit: Unit, y: np.ndarray) -> np.ndarray:
    """Per-value weights of the unit's squared output error: 1 + F / mean(F) (``ex`` in float mode).

    F, the Fisher diagonal, is the squared gradient of the label-free task
    loss w.r.t. the unit's output: the cross-entropy of the float model's
    output with its own argmax as the label (a final softmax is taken back
    to its logits).
    """
    fn = ex.function(
        [logits_node(ex.graph)], inputs=[unit.output]
    ).python_function  # eager: used once
    parts = []
    for start in range(0, len(y), EVAL_BATCH):
        x = tf.constant(y[start : start + EVAL_BATCH])
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = fn(x)[0]
            logits = tf.reshape(logits, [tf.shape(logits)[0], -1])
            label = tf.stop_gradient(tf.argmax(logits, axis=-1))
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(label, logits))
        parts.append(tf.square(tape.gradient(loss, x)).numpy())
    fisher = np.concatenate(parts)
    # the plain error kept alongside: a confident prediction has a vanishing gradient, and
    # a few uncertain samples alone would otherwise decide the rounding (and overfit)
    return 1.0 + fisher / max(float(np.mean(fisher)), 1e-30)

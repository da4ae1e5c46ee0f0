"""bn_folding: fold every batch norm that directly follows a quantizable layer into it.

For a BN after a Conv2D / DepthwiseConv2D / Dense whose output only it reads,
with ``k = gamma / sqrt(var + eps)`` per output channel::

    W' = W * k        b' = (b - mean) * k + beta

and the BN node is removed: the float model computes the same function and the
deployed integer model quantizes the folded kernel. The folded parameters are
kept in ``state.bn_stats[layer]``: after folding the layer's output channel c
is distributed as N(beta_c, gamma_c^2) (the BN's running statistics), which
data-free stages (CLE's high-bias absorption, analytical bias correction) need.

Batch norms that cannot be folded (after an activation or an Add, or whose
producer has other readers) stay in float and are named in the stage log.

Order: folding changes kernels and the tensors that are quantized, so it must
run before range_setting; it raises ConfigError when encodings are already set
rather than silently invalidating them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tinyptq.graph.base import ModelGraph, QuantLayer
from tinyptq.kernels import output_channels, scale_output_channels
from tinyptq.params import Boolean
from tinyptq.pipeline import PTQState, Stage, register, require_no_encodings


def unfolded_batch_norms(graph: ModelGraph) -> list[str]:
    """Names of the batch-norm nodes still in the graph."""
    return graph.batch_norm_names()


# ------------------------------------------------------------------ folding
def fold_bn(graph: ModelGraph, layer: QuantLayer) -> dict[str, Any] | str:
    """Fold ``layer.bn`` into the layer in place; its BN parameters, or why it was not folded."""
    assert layer.bn is not None
    p = graph.bn_params(layer.bn)
    gamma, beta, mean, var = (np.asarray(p[k], np.float64) for k in ("gamma", "beta", "mean", "var"))
    original = graph.kernel(layer.name)
    layout = graph.kernel_layout(layer.name)
    kernel = layout.to_canonical(original.astype(np.float64))
    n_out = output_channels(kernel)
    if gamma.shape != (n_out,):
        return f"{layer.bn}: {gamma.size} BN channels do not match {n_out} outputs of '{layer.name}'"
    k = gamma / np.sqrt(var + float(p["epsilon"]))
    bias = graph.bias(layer.name)
    bias = np.zeros(n_out) if bias is None else bias.astype(np.float64)
    folded = layout.from_canonical(scale_output_channels(kernel, k), original.shape)
    graph.set_kernel(layer.name, folded.astype(np.float32))
    graph.set_bias(layer.name, ((bias - mean) * k + beta).astype(np.float32))
    graph.remove_node(layer.bn)
    return {
        "gamma": np.asarray(p["gamma"], np.float32).copy(),
        "beta": np.asarray(p["beta"], np.float32).copy(),
        "mean": np.asarray(p["mean"], np.float32).copy(),
        "var": np.asarray(p["var"], np.float32).copy(),
        "epsilon": float(p["epsilon"]),
    }


@register
class BNFolding(Stage):
    """Fold batch norms into the preceding Conv2D / DepthwiseConv2D / Dense."""

    name = "bn_folding"
    precedes = ("range_setting",)
    batch_norms_only = True
    uses_quant_config = False

    parameter_constraints = {"log_skipped": Boolean()}

    def __init__(self, log_skipped: bool = True) -> None:
        self.log_skipped = log_skipped  # a real bool: validated before this body runs

    def apply(self, state: PTQState) -> PTQState:
        """A new state whose graph has its foldable BNs folded (the input state is untouched)."""
        require_no_encodings(state, self.name)
        state = state.evolve(copy_graph=True)
        graph = state.graph
        folded: dict[str, str] = {}
        reasons: list[str] = []
        for layer in graph.quant_layers():
            if layer.bn is None:
                continue
            result = fold_bn(graph, layer)
            if isinstance(result, str):
                reasons.append(result)
                continue
            folded[layer.name] = layer.bn
            state.bn_stats[layer.name] = result
        left = unfolded_batch_norms(graph)
        lines = [f"folded {len(folded)} batch norms into their layers"]
        if left:
            lines.append(f"{len(left)} batch norms stay in float (not directly after a layer): {', '.join(left)}")
        if self.log_skipped:
            lines += [f"not folded: {r}" for r in reasons]
        self.record(state, lines, folded=folded, unfolded=left or [])
        return state

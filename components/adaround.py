"""adaround: learn each weight's rounding (up or down) layer by layer (Nagel et al. 2020).

Every quantizable layer, in network order, gets rounding variables V whose
soft rounding h(V) is learned so that the layer's output (after its fused
BN / ReLU, before its own quantizer) matches the float model's on the
calibration data, with a regularizer that drives h(V) to 0 or 1 (see
:mod:`tinyptq.rounding`). The layer's input comes from the network already
rounded and quantized upstream (``input_from: float``: from the float
network). The hard rounding becomes ``state.fixed_weights`` (integers on the
weight encoding's grid), which the simulation and every exporter use.
``qdrop`` keeps that fraction of the activations in float while learning
(Wei et al. 2022). After range_setting, before bias_correction; one rounding
stage per pipeline (a second one is refused: it would start from, and
overwrite, the first one's rounding).
"""

from __future__ import annotations

from tinyptq.graph.base import ModelGraph
from tinyptq.pipeline import register
from tinyptq.rounding.stage import RECONSTRUCTION_CONSTRAINTS, ReconstructionStage
from tinyptq.rounding.units import Unit, layer_units


@register
class AdaRound(ReconstructionStage):
    """Adaptive rounding of every kernel by layer-wise output reconstruction."""

    name = "adaround"
    parameter_constraints = dict(RECONSTRUCTION_CONSTRAINTS)

    def __init__(
        self,
        iterations: int = 2000,
        batch_size: int = 16,
        learning_rate: float = 0.01,
        reg_weight: float = 10.0,
        warmup: float = 0.2,
        beta_start: float = 20.0,
        beta_end: float = 2.0,
        input_from: str = "quantized",
        qdrop: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self._store(locals())  # validated against parameter_constraints before this body runs

    def units(self, graph: ModelGraph) -> list[Unit]:
        """One unit per quantizable layer."""
        return layer_units(graph)

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
(Wei et al. 2022). After range_setting; one rounding stage per pipeline.
"""

from __future__ import annotations

from typing import Any, ClassVar

from tinyptq.params import BATCH_SIZE, SEED, Integer, Optional, Options, Real, validate
from tinyptq.pipeline import PTQState, Stage, register
from tinyptq.rounding import Settings, layer_units, run_reconstruction

# options shared with brecq (same names, same constraints)
RECONSTRUCTION_CONSTRAINTS = {
    "iterations": Integer(1, 10**7),
    "batch_size": BATCH_SIZE,
    "learning_rate": Real(0.0, 1.0, lo_open=True),
    "reg_weight": Real(0.0, None),
    "warmup": Real(0.0, 1.0, hi_open=True),
    "beta_start": Real(0.0, 100.0, lo_open=True),
    "beta_end": Real(0.0, 100.0, lo_open=True),
    "input_from": Options("quantized", "float"),
    "qdrop": Real(0.0, 1.0),
    "seed": Optional(SEED),
}


def check_beta_range(owner: str, params: dict[str, Any]) -> dict[str, Any]:
    """beta is annealed downwards: beta_end may not exceed beta_start."""
    if "beta_start" in params and "beta_end" in params:
        validate(owner, "beta_end", params["beta_end"], Real(0.0, params["beta_start"], lo_open=True))
    return params


@register
class AdaRound(Stage):
    """Adaptive rounding of every kernel by layer-wise output reconstruction."""

    name = "adaround"
    requires = ("range_setting",)
    rounds_weights: ClassVar[bool] = True
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
        # validated against parameter_constraints before this body runs
        self.iterations = iterations
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.reg_weight = reg_weight
        self.warmup = warmup
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.input_from = input_from
        self.qdrop = qdrop
        self.seed = seed

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """beta_end <= beta_start."""
        return check_beta_range(cls.name, params)

    def settings(self, state: PTQState) -> Settings:
        """The reconstruction settings of these options (seed: the state's when unset)."""
        params = self.get_params()
        params["seed"] = state.seed if self.seed is None else self.seed
        return Settings(**params)

    def apply(self, state: PTQState) -> PTQState:
        """Fixed (learned) integer kernels for every quantized layer."""
        return run_reconstruction(self, state, layer_units(state.graph), self.settings(state))

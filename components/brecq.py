"""brecq: learn the weights' rounding block by block (Li et al. 2021).

AdaRound's optimization (:mod:`tinyptq.rounding`) over reconstruction blocks
(``graph.blocks()``: residual blocks, depthwise-separable pairs, single
layers): all rounding variables of a block are learned together against the
block's float output, so the rounding of one layer can make up for another's.
Options beyond adaround's:

- ``loss: fisher`` weights each output value's squared error by the squared
  gradient of the task loss w.r.t. it (the Fisher diagonal), computed label
  free on the float model (cross-entropy with its own argmax); ``mse`` weights
  all alike (use it for models that are not classifiers).
- ``learn_act_steps``: the steps of the activation quantizers inside the block
  (its input and interior points) are learned with the rounding (LSQ
  gradients), at ``act_learning_rate`` relative to each step; they become the
  state's activation encodings (same zero point and bits).
- ``qdrop`` as for adaround.
"""

from __future__ import annotations

from typing import Any, ClassVar

from tinyptq.components.adaround import RECONSTRUCTION_CONSTRAINTS, check_beta_range
from tinyptq.params import SEED, Boolean, Optional, Options, Real
from tinyptq.pipeline import PTQState, Stage, register
from tinyptq.rounding import Settings, block_units, run_reconstruction


@register
class BRECQ(Stage):
    """Block reconstruction of the weights' rounding, optionally Fisher-weighted and with learned steps."""

    name = "brecq"
    requires = ("range_setting",)
    rounds_weights: ClassVar[bool] = True
    parameter_constraints = {
        **RECONSTRUCTION_CONSTRAINTS,
        "loss": Options("mse", "fisher"),
        "learn_act_steps": Boolean(),
        "act_learning_rate": Real(0.0, 1.0, lo_open=True),
        "seed": Optional(SEED),
    }

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
        loss: str = "mse",
        learn_act_steps: bool = False,
        act_learning_rate: float = 0.001,
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
        self.loss = loss
        self.learn_act_steps = learn_act_steps
        self.act_learning_rate = act_learning_rate
        self.seed = seed

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """beta_end <= beta_start."""
        return check_beta_range(cls.name, params)

    def settings(self, state: PTQState) -> Settings:
        """The reconstruction settings of these options (seed: the state's when unset)."""
        params = self.get_params()
        params["seed"] = state.seed if self.seed is None else self.seed
        params["act_learning_rate"] = self.act_learning_rate if self.learn_act_steps else None
        del params["learn_act_steps"]
        return Settings(**params)

    def apply(self, state: PTQState) -> PTQState:
        """Fixed (learned) integer kernels for every quantized layer, block by block."""
        units = block_units(state.graph)
        return run_reconstruction(self, state, units, self.settings(state), learn_steps=self.learn_act_steps)

"""brecq: learn the weights' rounding block by block (Li et al. 2021).

AdaRound's optimization (:mod:`tinyptq.rounding`) over reconstruction blocks
(``graph.blocks()``: residual blocks, depthwise-separable pairs, single
layers): all rounding variables of a block are learned together against the
block's float output, so the rounding of one layer can make up for another's.
Options beyond adaround's:

- ``loss: fisher`` weights each output value's squared error by
  ``1 + F / mean(F)``, F the squared gradient of the task loss w.r.t. it (the
  Fisher diagonal), computed label free on the float model (cross-entropy
  with its own argmax); the 1 keeps the plain error, which alone would be
  left to the few samples the model is unsure of. ``mse`` weights all alike
  (use it for models that are not classifiers).
- ``learn_act_steps``: the steps of the activation quantizers inside the block
  (its input and interior points) are learned with the rounding (LSQ
  gradients), at ``act_learning_rate`` relative to each step; they become the
  state's activation encodings (same zero point and bits).
- ``qdrop`` as for adaround.
"""

from __future__ import annotations

from tinyptq.graph.base import ModelGraph
from tinyptq.params import Boolean, Options, Real
from tinyptq.pipeline import register
from tinyptq.rounding.stage import RECONSTRUCTION_CONSTRAINTS, ReconstructionStage
from tinyptq.rounding.units import Unit, block_units


@register
class BRECQ(ReconstructionStage):
    """Block reconstruction of the weights' rounding, optionally Fisher-weighted and with learned steps."""

    name = "brecq"
    parameter_constraints = {
        **RECONSTRUCTION_CONSTRAINTS,
        "loss": Options("mse", "fisher"),
        "learn_act_steps": Boolean(),
        "act_learning_rate": Real(0.0, 1.0, lo_open=True),
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
        act_learning_rate: float = 0.0001,
        seed: int | None = None,
    ) -> None:
        self._store(locals())  # validated against parameter_constraints before this body runs

    def units(self, graph: ModelGraph) -> list[Unit]:
        """One unit per reconstruction block."""
        return block_units(graph)

    def learns_steps(self) -> bool:
        """``learn_act_steps``."""
        return self.learn_act_steps

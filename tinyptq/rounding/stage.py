"""What adaround and brecq share as pipeline stages: their options, settings and run."""

from __future__ import annotations

from typing import Any, ClassVar

from tinyptq.graph.base import ModelGraph
from tinyptq.params import BATCH_SIZE, SEED, Integer, Optional, Options, Real
from tinyptq.pipeline import PTQState, Stage
from tinyptq.rounding.reconstruct import Settings
from tinyptq.rounding.run import run_reconstruction
from tinyptq.rounding.units import Unit

# the options of every reconstruction stage (same names, same constraints)
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


class ReconstructionStage(Stage):
    """A stage that learns the weights' rounding unit by unit (subclasses say which units)."""

    requires = ("range_setting",)
    precedes = ("bias_correction",)  # bias correction measures the rounding's error: after it
    rounds_weights: ClassVar[bool] = True

    @classmethod
    def streams_batches(cls) -> bool:
        """No: ``batch_size`` is the optimization's minibatch (a pipeline's calibration.batch_size leaves it)."""
        return False

    def _store(self, options: dict[str, Any]) -> None:
        """Keep the (already validated) constructor options as attributes."""
        for name in self.param_names():
            setattr(self, name, options[name])

    def units(self, graph: ModelGraph) -> list[Unit]:
        """What is reconstructed at once, in network order."""
        raise NotImplementedError

    def learns_steps(self) -> bool:
        """Whether activation steps are learned with the rounding."""
        return False

    def settings(self, state: PTQState) -> Settings:
        """The reconstruction settings of these options (seed: the state's when unset)."""
        fields = set(Settings.__dataclass_fields__) - {"act_learning_rate"}
        params = {k: v for k, v in self.get_params().items() if k in fields}
        params["seed"] = state.seed if self.seed is None else self.seed
        if self.learns_steps():  # None: the steps stay fixed
            params["act_learning_rate"] = self.act_learning_rate
        return Settings(**params)

    def apply(self, state: PTQState) -> PTQState:
        """Fixed (learned) integer kernels for every quantized layer."""
        units = self.units(state.graph)
        return run_reconstruction(
            self, state, units, self.settings(state), learn_steps=self.learns_steps()
        )

"""gptq: choose each kernel's integers by second-order error compensation (Frantar et al. 2022).

GPTQ ("Accurate Post-Training Quantization for Generative Pre-trained
Transformers") rounds a layer's kernel W one input column at a time and, after
each column, moves the still unrounded columns so that the layer's output on
the calibration inputs X changes as little as possible: with the Hessian
H = 2 X^T X / n of the layer's squared output error and U the upper Cholesky
factor of H^-1, rounding column j with error e_j updates the later columns by
-e_j U[j, j+1:] / U[j, j]. Columns go in blocks (lazy batch updates), optionally
in order of decreasing H_jj (``act_order``).

Here the grid is fixed: ``range_setting`` chose the scale and zero point of
every kernel (per tensor or per output channel), GPTQ only chooses which grid
integer each weight takes. The results go to ``state.fixed_weights`` (int32,
the graph's kernel layout); the float kernels of the graph stay as they are.

Every quantizable layer is a matrix problem:
- Dense: the rows of X are the input vectors (all leading positions);
- Conv2D (and Conv1D): the im2col view, one row per output position holding
  the in_per_group * kh * kw values the kernel reads (strides, explicit pads,
  dilations as the layer runs), one problem per group;
- DepthwiseConv2D: the same grouped view with groups = channels, so that each
  channel is its own small kh * kw problem (all solved together, batched).

Layers go in network order. With ``input: quantized`` (default) a layer's X is
what it reads in the simulated network of the state, with the integers GPTQ
chose for the layers before it (the quantized upstream network, as in the
paper's sequential mode); ``input: float`` takes X from the float model.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from tinyptq.errors import ConfigError
from tinyptq.graph.spec import LayerSpec
from tinyptq.params import BATCH_SIZE, Boolean, Integer, Options, Real
from tinyptq.pipeline import PTQState, Stage, register
from tinyptq.rounding.gptq import Hessian, LayerResult, conv_groups, layer_rows, solve_layer

INPUTS = ("quantized", "float")


# ------------------------------------------------------------------ stage
@register
class GPTQ(Stage):
    """Choose kernel integers on the range_setting grids by GPTQ, layer by layer."""

    name = "gptq"
    requires = ("range_setting",)
    # bias_correction measures the error of the kernels it sees: it must come after
    precedes = ("bias_correction",)
    rounds_weights = True

    parameter_constraints = {
        "block_size": Integer(1, 2**16),
        "percdamp": Real(0.0, 1.0, lo_open=True),
        "act_order": Boolean(),
        "batch_size": BATCH_SIZE,
        "input": Options(*INPUTS),
    }

    def __init__(
        self,
        block_size: int = 128,
        percdamp: float = 0.01,
        act_order: bool = False,
        batch_size: int = 128,
        input: str = "quantized",  # noqa: A002  (the option's name in pipeline files)
    ) -> None:
        # validated against parameter_constraints before this body runs
        self.block_size = block_size
        self.percdamp = percdamp
        self.act_order = act_order
        self.batch_size = batch_size
        self.input = input

    def apply(self, state: PTQState) -> PTQState:
        """A new state with GPTQ integers in ``fixed_weights`` for every layer with a weight encoding."""
        from tqdm import tqdm

        from tinyptq.sim import QuantSim

        if not state.weight_encodings:
            raise ConfigError(
                "gptq needs weight encodings: put range_setting before it in the pipeline"
            )
        state = state.evolve()
        graph = state.graph
        layers = [ql.name for ql in graph.quant_layers() if ql.name in state.weight_encodings]
        specs = {name: graph.layer_spec(name) for name in layers}
        sources = {name: graph.inputs_of(name)[0] for name in layers}
        sim = QuantSim(state) if self.input == "quantized" else None
        hessians = self._float_hessians(state, specs, sources) if sim is None else {}
        results: dict[str, LayerResult] = {}
        # one compiled function reads every layer input: changing kernels needs no retrace, a new output list would
        wanted = list(dict.fromkeys(sources.values()))
        for name in tqdm(layers, desc="gptq", unit="layer", file=sys.stderr, leave=False):
            start = time.perf_counter()
            if sim is not None:
                hessians[name] = self._quantized_hessian(
                    sim, state.calib, specs[name], sources[name], wanted
                )
            hessian, groups = hessians.pop(name)
            result = solve_layer(
                state, name, hessian, groups, self.block_size, self.percdamp, self.act_order
            )
            result.seconds = time.perf_counter() - start
            state.fixed_weights[name] = result.integers
            if sim is not None:  # the layers after it read its output with these integers
                sim.set_kernel(name, state.weight_encodings[name].dequantize(result.integers))
            results[name] = result
        self.record(state, self._lines(results), layers={n: _detail(r) for n, r in results.items()})
        return state

    def _quantized_hessian(
        self, sim: Any, calib: np.ndarray, spec: LayerSpec, source: str, wanted: list[str]
    ) -> tuple[np.ndarray, int]:
        """H of one layer from what it reads in the simulated network (its upstream integers fixed).

        ``source`` is the node the layer reads (after any flatten / pad / reshape
        behind its input point), taken as the layer sees it: quantized where it
        is an activation point, else carrying the grid of the point before it.
        """
        acc, groups = Hessian(), 1
        for start in range(0, len(calib), self.batch_size):
            batch = calib[start : start + self.batch_size]
            x = sim.run(batch, self.batch_size, outputs=wanted)[source]
            groups = _groups(spec, x)
            acc.add(layer_rows(x, spec))
        return acc.matrix, groups

    def _float_hessians(
        self, state: PTQState, specs: dict[str, LayerSpec], sources: dict[str, str]
    ) -> dict[str, tuple[np.ndarray, int]]:
        """H of every layer from the float model, in one pass over the calibration data."""
        accs = {name: Hessian() for name in specs}
        groups = dict.fromkeys(specs, 1)
        wanted = list(dict.fromkeys(sources.values()))
        for batch in state.graph.iterate(state.calib, wanted, self.batch_size):
            for name, spec in specs.items():
                x = batch[sources[name]]
                groups[name] = _groups(spec, x)
                accs[name].add(layer_rows(x, spec))
        return {name: (acc.matrix, groups[name]) for name, acc in accs.items()}

    def _lines(self, results: dict[str, LayerResult]) -> list[str]:
        """One line per layer: output MSE with nearest rounding and with GPTQ, seconds."""
        order = "activation order" if self.act_order else "natural order"
        lines = [f"{len(results)} layers, {self.input} inputs, {order}, block {self.block_size}"]
        for name, r in results.items():
            ratio = r.mse_gptq / r.mse_nearest if r.mse_nearest > 0 else 1.0
            kept = f", {r.rows_kept_nearest} channels kept nearest" if r.rows_kept_nearest else ""
            lines.append(
                f"{name}: output MSE {r.mse_nearest:.4g} (nearest) -> {r.mse_gptq:.4g} (x{ratio:.3f}){kept}, "
                f"{r.seconds:.2f} s"
            )
        return lines


def _groups(spec: LayerSpec, x: np.ndarray) -> int:
    if spec.kind == "dense":
        return 1
    return conv_groups(spec, x.shape[-1] if spec.channels_last else x.shape[1])


def _detail(r: LayerResult) -> dict[str, Any]:
    return {
        "mse_nearest": r.mse_nearest,
        "mse_gptq": r.mse_gptq,
        "rows_kept_nearest": r.rows_kept_nearest,
        "damping": r.damping,
        "seconds": round(r.seconds, 4),
    }

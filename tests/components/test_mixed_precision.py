"""mixed_precision: every budget holds (checked by the cost model), later stages run at the chosen bits,
tighter budgets cost accuracy, infeasible and missing budgets, options, first / last layers, order, ONNX.

Two tiny models: the fragile model of tests/core/test_sensitivity.py (one layer
that per-tensor low-bit weights destroy; output-SQNR sensitivity, shared with
that file) for the accuracy claims, and the small model of tests/core/test_cost.py
(residual add, depthwise, an unfolded batch norm: a non-trivial peak activation
memory and float parameters outside the layers) for the budget arithmetic, with
the cheap ``myqasr`` sensitivity.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import tinyptq.components.mixed_precision as mp
from tests.core import memory_usecase as mem
from tests.core.test_cost import small_model
from tests.core.test_sensitivity import (
    ACT_BITS,
    PER_TENSOR,
    SAMPLES,
    WEIGHT_BITS,
    calibration,
    fragile_graph,
    fragile_state,
)
from tinyptq import api
from tinyptq.allocation import BUDGETS, smallest_feasible
from tinyptq.components.range_setting import first_last_layers, first_last_points
from tinyptq.config import LayerOverride, QuantConfig
from tinyptq.cost import CostModel, ModelCost
from tinyptq.errors import ConfigError
from tinyptq.graph.loading import load_graph
from tinyptq.graph.onnx_graph import OnnxGraph
from tinyptq.pipeline import MemoryCache, Pipeline, PTQState, create_stage, order_problem
from tinyptq.sensitivity import measure
from tinyptq.sim import QuantSim

FLOAT = mp.FLOAT_BITS
KIB = 1024
FRAGILE_OPTIONS = {"weight_candidates": list(WEIGHT_BITS), "act_candidates": list(ACT_BITS), "samples": SAMPLES}
SMALL_OPTIONS = {"weight_candidates": [2, 4, 8], "act_candidates": [4, 8], "sensitivity": "myqasr", "samples": SAMPLES}
PER_CHANNEL = QuantConfig(weight_bits=8, act_bits=8, weight_per_channel=True)
MSE_RANGES = {"weights": "mse", "activations": "mse"}


# ----------------------------------------------------------------- helpers
def quantities(cost: ModelCost) -> dict[str, float]:
    """Every budgeted quantity of a cost, in the budgets' units (KiB = 1024 bytes; total = weights + peak)."""
    return {
        "weight_kb": cost.weight_bytes / KIB,
        "activation_kb": cost.peak_activation_bytes / KIB,
        "total_kb": (cost.weight_bytes + cost.peak_activation_bytes) / KIB,
        "bops": float(cost.bops),
        "memory_io_kb": cost.memory_io_bytes / KIB,
    }


def assert_within(cost: ModelCost, budgets: dict[str, float]) -> None:
    q = quantities(cost)
    for name, budget in budgets.items():
        assert q[name] <= budget * (1 + 1e-9), f"{name} {q[name]} over its budget {budget}"


def allocation(state: PTQState) -> dict:
    (record,) = [r for r in state.log if r.stage == "mixed_precision"]
    return record.details["allocation"]


def mixed(graph, config: QuantConfig, memo, calib=None, **options) -> PTQState:
    state = PTQState(graph, config, calibration() if calib is None else calib, cache=memo)
    return create_stage("mixed_precision", options).apply(state)


def assert_runs_at_the_chosen_bits(state: PTQState) -> None:
    """Every layer's kernel and every point at the bits the stage logged (float: no encoding)."""
    chosen = allocation(state)
    graph = state.graph
    assert set(chosen["weight_bits"]) == {q.name for q in graph.quant_layers()}
    assert set(chosen["act_bits"]) == {p.name for p in graph.act_points()}
    for layer, bits in chosen["weight_bits"].items():
        enc = state.weight_encodings.get(layer)
        assert (FLOAT if enc is None else enc.bits) == bits, layer
    for point, bits in chosen["act_bits"].items():
        enc = state.act_encodings.get(point)
        assert (FLOAT if enc is None else enc.bits) == bits, point


@pytest.fixture(scope="module")
def small():
    """The small model and its ONNX twin, each with a memo (sensitivity and activation statistics)."""
    graph = load_graph(small_model())
    return {
        "keras": (graph, MemoryCache()),
        "onnx": (OnnxGraph.from_onnx(graph.to_onnx().model), MemoryCache()),
    }


@pytest.fixture(scope="module")
def small_range(small):
    """Per budget: the smallest value any allocation reaches, and the value of all-8-bit (the candidates' top)."""
    graph, memo = small["keras"]
    state = PTQState(graph, PER_CHANNEL, calibration(), cache=memo)
    stage = create_stage("mixed_precision", {**SMALL_OPTIONS, "weight_kb": 1.0})
    sens = measure(state, stage.weight_candidates, stage.act_candidates, "myqasr", SAMPLES, progress=False)
    problem = stage.problem(state, sens, CostModel(graph))
    top = quantities(CostModel(graph).for_config(PER_CHANNEL))
    return {name: (smallest_feasible(problem, name, {}), top[name]) for name in BUDGETS}


def between(small_range, name: str, fraction: float) -> float:
    lo, hi = small_range[name]
    assert lo < hi
    return lo + fraction * (hi - lo)


_SIM: dict[str, QuantSim] = {}


def simulate(state: PTQState, x: np.ndarray) -> np.ndarray:
    """QuantSim(state).predict(x) through one simulation of the fragile graph, encodings swapped in place."""
    assert not state.fixed_weights
    if "sim" not in _SIM:
        _SIM["sim"] = QuantSim(state)
    sim = _SIM["sim"]
    for layer in (q.name for q in state.graph.quant_layers()):
        if layer in state.weight_encodings:
            sim.set_encoding(layer, state.weight_encodings[layer], "weight")
        sim.quantizer(layer, "weight").enable(layer in state.weight_encodings)
    for point in (p.name for p in state.graph.act_points()):
        if point in state.act_encodings:
            sim.set_encoding(point, state.act_encodings[point])
        sim.quantizer(point).enable(point in state.act_encodings)
    return sim.predict(x)


def output_mse(state: PTQState, x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean((simulate(state, x) - ref) ** 2))


# ------------------------------------------------------- budgets hold
SINGLE = [{name: f} for name in BUDGETS for f in (0.2, 0.6)]
COMBINED = [
    {"weight_kb": 0.5, "activation_kb": 0.5},
    {"bops": 0.3, "memory_io_kb": 0.7},
    {"total_kb": 0.4, "bops": 0.6},
    {"weight_kb": 0.3, "memory_io_kb": 0.5, "activation_kb": 0.8},
    dict.fromkeys(BUDGETS, 0.5),
]


@pytest.mark.parametrize(
    "fractions", SINGLE + COMBINED, ids=lambda f: ",".join(f"{k}@{v}" for k, v in f.items())
)
def test_the_allocation_never_exceeds_a_budget(small, small_range, fractions):
    graph, memo = small["keras"]
    budgets = {name: between(small_range, name, f) for name, f in fractions.items()}
    state = mixed(graph, PER_CHANNEL, memo, **SMALL_OPTIONS, **budgets)
    by_config = CostModel(state.graph).for_config(state.config)
    assert_within(by_config, budgets)
    # the stage's own figures are the cost model's
    record = state.log[-1]
    assert record.details["cost"] == by_config.summary()
    for name, value in quantities(by_config).items():
        assert allocation(state)["costs"][name] == pytest.approx(value, rel=1e-12)
    assert record.lines[0].startswith("budgets: ") and all(name in record.lines[0] for name in budgets)
    # and so do the encodings range_setting then sets
    done = create_stage("range_setting").apply(state)
    by_state = CostModel(done.graph).for_state(done)
    assert by_state.summary() == by_config.summary()
    assert_within(by_state, budgets)
    assert_runs_at_the_chosen_bits(done)


def test_looser_budgets_never_cost_accuracy_and_the_budget_binds(small, small_range):
    """The program is exact: the summed error cannot rise as a budget grows; the tight one is nearly used up."""
    graph, memo = small["keras"]
    errors, used = [], []
    for f in (0.0, 0.1, 0.3, 0.6, 1.0):
        budget = between(small_range, "weight_kb", f)
        chosen = allocation(mixed(graph, PER_CHANNEL, memo, **SMALL_OPTIONS, weight_kb=budget))
        errors.append(chosen["error"])
        used.append(chosen["costs"]["weight_kb"])
        assert used[-1] <= budget * (1 + 1e-9)
    assert errors == sorted(errors, reverse=True) and errors[0] > errors[-1]
    assert used[0] == pytest.approx(small_range["weight_kb"][0])  # the smallest feasible budget is met exactly
    assert set(allocation(mixed(graph, PER_CHANNEL, memo, **SMALL_OPTIONS, weight_kb=1e6))["weight_bits"].values()) == {8}


# ------------------------------------------- later stages use the bits
@pytest.mark.parametrize(
    ("budget", "ranges"), [({"weight_kb": 0.45}, MSE_RANGES), ({"bops": 0.3, "activation_kb": 0.3}, {})]
)
def test_range_setting_runs_at_the_chosen_bits(small, small_range, budget, ranges):
    graph, memo = small["keras"]
    budgets = {k: between(small_range, k, f) for k, f in budget.items()}
    state = mixed(graph, PER_CHANNEL, memo, **SMALL_OPTIONS, **budgets)
    chosen = allocation(state)
    assert len(set(chosen["weight_bits"].values()) | set(chosen["act_bits"].values())) > 1  # really mixed
    # one override per layer and point, after the configured ones
    assert len(state.config.overrides) == len(chosen["weight_bits"]) + len(chosen["act_bits"])
    for layer, bits in chosen["weight_bits"].items():
        assert state.config.weight_spec(layer).bits == bits
    done = Pipeline([create_stage("range_setting", ranges)]).run(state)
    assert_runs_at_the_chosen_bits(done)
    assert [r.stage for r in done.log] == ["mixed_precision", "range_setting"]


def test_a_float_override_stays_float(small, small_range):
    """quantize: false on a point owned by a quantized layer: the layer's new bit override must not switch it on."""
    graph, memo = small["keras"]
    config = PER_CHANNEL.replace(overrides=(LayerOverride("r1", quantize=False),))  # r1: c1's output
    budgets = {"weight_kb": between(small_range, "weight_kb", 0.3)}
    state = mixed(graph, config, memo, **SMALL_OPTIONS, **budgets)
    chosen = allocation(state)
    assert chosen["act_bits"]["r1"] == FLOAT and chosen["weight_bits"]["c1"] != FLOAT
    assert state.config.act_spec("r1", "c1") is None and state.config.weight_spec("c1") is not None
    done = create_stage("range_setting").apply(state)
    assert "r1" not in done.act_encodings and "c1" in done.weight_encodings
    assert_runs_at_the_chosen_bits(done)
    assert_within(CostModel(graph).for_state(done), budgets)


def test_a_layer_switched_back_on_after_a_float_wildcard_gets_bits(small):
    graph, memo = small["keras"]
    config = PER_CHANNEL.replace(overrides=(LayerOverride("*", quantize=False), LayerOverride("dw", weight_bits=8)))
    state = mixed(graph, config, memo, **SMALL_OPTIONS, weight_kb=10.0)
    chosen = allocation(state)
    assert {k for k, b in chosen["weight_bits"].items() if b != FLOAT} == {"dw"}
    assert {k for k, b in chosen["act_bits"].items() if b != FLOAT} == {"dw"}  # the point dw owns
    assert_runs_at_the_chosen_bits(create_stage("range_setting").apply(state))


# ------------------------------------------------ accuracy against size
@pytest.fixture(scope="module")
def fragile():
    """The fragile model's float outputs on held-out inputs, and the cost of uniform W4A8 / W8A8."""
    graph = fragile_graph()
    x = np.random.default_rng(7).normal(size=(64, 8, 8, 3)).astype(np.float32)
    cost = CostModel(graph)
    return {
        "x": x,
        "ref": graph.predict(x),
        "w4": cost.for_config(PER_TENSOR.replace(weight_bits=4)),
        "w8": cost.for_config(PER_TENSOR),
    }


def fragile_mixed(config=PER_TENSOR, **budgets) -> PTQState:
    state = fragile_state(config, graph=fragile_graph().copy())
    return create_stage("mixed_precision", {**FRAGILE_OPTIONS, **budgets}).apply(state)


def test_a_tight_budget_costs_accuracy_and_saves_bytes(fragile):
    x, ref = fragile["x"], fragile["ref"]
    results = {}
    for name, kb in (("tight", fragile["w4"].weight_bytes / KIB * 0.8), ("loose", fragile["w8"].weight_bytes / KIB)):
        state = fragile_mixed(weight_kb=kb)
        done = create_stage("range_setting", MSE_RANGES).apply(state)
        results[name] = (allocation(state)["error"], output_mse(done, x, ref), CostModel(done.graph).for_state(done))
        assert_within(results[name][2], {"weight_kb": kb})
    (tight_err, tight_mse, tight_cost), (loose_err, loose_mse, loose_cost) = results["tight"], results["loose"]
    assert tight_cost.weight_bytes < loose_cost.weight_bytes
    assert tight_err > loose_err and tight_mse > loose_mse


def test_at_the_size_of_uniform_w4_mixed_precision_is_more_accurate(fragile):
    """The fragile layer needs more than 4 bits; mixed precision pays for it with bits from the others."""
    x, ref = fragile["x"], fragile["ref"]
    w4_kb = fragile["w4"].weight_bytes / KIB
    state = fragile_mixed(weight_kb=w4_kb)
    chosen = allocation(state)
    assert chosen["weight_bits"]["c2"] > 4 and min(chosen["weight_bits"].values()) < 4
    assert set(chosen["act_bits"].values()) == {8}  # no activation budget: the activations stay at 8 bits
    done = create_stage("range_setting", MSE_RANGES).apply(state)
    uniform = create_stage("range_setting", MSE_RANGES).apply(
        fragile_state(PER_TENSOR.replace(weight_bits=4), graph=fragile_graph().copy())
    )
    assert CostModel(done.graph).for_state(done).weight_bytes <= fragile["w4"].weight_bytes
    mixed_mse, uniform_mse = output_mse(done, x, ref), output_mse(uniform, x, ref)
    assert mixed_mse < 0.5 * uniform_mse, (mixed_mse, uniform_mse)


def test_keep_first_last_8bit(fragile):
    config = PER_TENSOR.replace(keep_first_last_8bit=True)
    state = fragile_mixed(config, weight_kb=fragile["w4"].weight_bytes / KIB, activation_kb=0.9)
    chosen = allocation(state)
    graph = state.graph
    edge_layers, edge_points = first_last_layers(graph), first_last_points(graph)
    assert edge_layers == {"c1", "fc"}
    assert all(chosen["weight_bits"][n] == 8 for n in edge_layers)
    assert all(chosen["act_bits"][p] == 8 for p in edge_points)
    assert min(chosen["weight_bits"].values()) < 8 and min(chosen["act_bits"].values()) < 8
    assert_runs_at_the_chosen_bits(create_stage("range_setting").apply(state))


# ------------------------------------------------------------- errors
def test_an_infeasible_budget_names_the_smallest_feasible_value(small):
    graph, memo = small["keras"]
    for name, value in (("weight_kb", 0.05), ("bops", 1000.0), ("activation_kb", 0.01)):
        with pytest.raises(ConfigError) as err:
            mixed(graph, PER_CHANNEL, memo, **SMALL_OPTIONS, **{name: value})
        text = str(err.value)
        assert "\n" not in text and f"budget {name}={value:g} cannot be met" in text, text
        found = re.search(rf"the smallest feasible {name} is ([0-9.e+]+)$", text)
        assert found, text
        smallest = float(found.group(1))
        assert smallest > value
        state = mixed(graph, PER_CHANNEL, memo, **SMALL_OPTIONS, **{name: smallest})
        assert_within(CostModel(graph).for_config(state.config), {name: smallest})


def test_budgets_that_cannot_be_met_together(small, small_range):
    """Every quantity falls with fewer bits, so only a budget infeasible alone makes a set infeasible;
    the message names it, with the smallest value that fits beside the others."""
    graph, memo = small["keras"]
    weight_kb = between(small_range, "weight_kb", 0.5)
    bops = small_range["bops"][0] * 0.9
    with pytest.raises(ConfigError) as err:
        mixed(graph, PER_CHANNEL, memo, **SMALL_OPTIONS, weight_kb=weight_kb, bops=bops)
    text = str(err.value)
    assert "\n" not in text and f"budgets weight_kb={weight_kb:g}, bops={bops:g} cannot be met together" in text
    found = re.search(r"the smallest feasible bops is ([0-9.e+]+) \(with the other budgets as given\)$", text)
    assert found and "smallest feasible weight_kb" not in text, text
    state = mixed(graph, PER_CHANNEL, memo, **SMALL_OPTIONS, weight_kb=weight_kb, bops=float(found.group(1)))
    assert_within(CostModel(graph).for_config(state.config), {"weight_kb": weight_kb, "bops": float(found.group(1))})


def test_no_budget_is_an_error_listing_them(small, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("sensitivity was measured")

    monkeypatch.setattr(mp, "measure", boom)
    graph, memo = small["keras"]
    with pytest.raises(ConfigError) as err:
        mixed(graph, PER_CHANNEL, memo, **SMALL_OPTIONS)
    assert str(err.value) == "mixed_precision needs at least one budget: " + ", ".join(BUDGETS)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"sensitivity": "hessian"}, "mixed_precision option 'sensitivity' must be one of 'sqnr', 'kl', 'myqasr'"),
        ({"weight_candidates": [1, 4]}, "option 'weight_candidates' must be a non-empty list of distinct integers"),
        ({"weight_candidates": [4, 17]}, "option 'weight_candidates'"),
        ({"act_candidates": []}, "option 'act_candidates'"),
        ({"act_candidates": [8, 8]}, "option 'act_candidates'"),
        ({"weight_kb": 0}, "option 'weight_kb' must be a number > 0"),
        ({"bops": -1.0}, "option 'bops' must be a number > 0"),
        ({"samples": 0}, "option 'samples' must be an integer >= 1"),
        ({"size_kb": 3}, "unknown option 'size_kb' for stage 'mixed_precision'"),
    ],
)
def test_bad_options_are_config_errors(options, needle):
    with pytest.raises(ConfigError) as err:
        create_stage("mixed_precision", options)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_candidates_are_sorted_and_used_as_given(small):
    graph, memo = small["keras"]
    stage = create_stage("mixed_precision", {**SMALL_OPTIONS, "weight_candidates": [8, 2, 4], "weight_kb": 10.0})
    assert stage.weight_candidates == [2, 4, 8]
    state = stage.apply(PTQState(graph, PER_CHANNEL, calibration(), cache=memo))
    sens = state.log[-1].details["sensitivity"]
    assert all(set(d) == {"2", "4", "8"} for d in sens["weight"].values())
    assert all(set(d) == {"4", "8"} for d in sens["act"].values())


# ------------------------------------------------------------- ordering
def test_mixed_precision_runs_before_range_setting(monkeypatch):
    assert order_problem(["bn_folding", "cle", "mixed_precision", "range_setting", "bias_correction"]) is None
    assert order_problem(["mixed_precision", "range_setting", "adaround"]) is None
    assert order_problem(["range_setting", "mixed_precision"]) == "mixed_precision must run before range_setting"
    assert order_problem(["mixed_precision", "range_setting", "gptq", "mixed_precision"]).startswith(
        "mixed_precision must run before"
    )
    assert order_problem(["mixed_precision"]) == "no range_setting stage: nothing would be quantized"
    spec = api.load_pipeline("mixed_precision")  # the built-in pipeline is in order
    assert order_problem([s.name for s in spec.build()]) is None

    def boom(*args, **kwargs):
        raise AssertionError("a stage ran")

    monkeypatch.setattr(Pipeline, "run", boom)
    with pytest.raises(ConfigError) as err:
        api.quantize(mem.NAME, {"name": "p", "stages": ["range_setting", {"mixed_precision": {"weight_kb": 1}}]})
    assert str(err.value) == "pipeline 'p' cannot run: mixed_precision must run before range_setting"


# ------------------------------------------------------------------ ONNX
def test_an_onnx_graph(small):
    graph, memo = small["onnx"]
    assert any("/" in p.name for p in graph.act_points())  # ONNX tensor names, escaped in the overrides
    cost = CostModel(graph)
    top = quantities(cost.for_config(PER_CHANNEL))
    budgets = {"weight_kb": top["weight_kb"] * 0.6, "activation_kb": top["activation_kb"] * 0.75}
    state = mixed(graph, PER_CHANNEL, memo, **SMALL_OPTIONS, **budgets)
    chosen = allocation(state)
    assert min(chosen["weight_bits"].values()) < 8 and min(chosen["act_bits"].values()) < 8
    assert_within(cost.for_config(state.config), budgets)
    done = create_stage("range_setting").apply(state)
    assert_within(cost.for_state(done), budgets)
    assert_runs_at_the_chosen_bits(done)

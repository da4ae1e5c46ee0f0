"""The bit-allocation integer program against brute force, budgets, infeasibility and scale."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tinyptq.allocation import (
    BUDGETS,
    Allocation,
    InfeasibleBudget,
    Problem,
    allocate,
    costs_of,
    smallest_feasible,
)
from tinyptq.errors import ConfigError

WEIGHT_BITS = (2, 3, 4, 6, 8)
ACT_BITS = (4, 8, 16)


def _options(rng: np.random.Generator, choices: tuple[int, ...], low: int, high: int) -> list[int]:
    count = int(rng.integers(low, high + 1))
    return sorted(int(b) for b in rng.choice(choices, size=count, replace=False))


def _problem(
    rng: np.random.Generator,
    inputs: dict[str, str | None],
    outputs: dict[str, str],
    steps: list[frozenset[str]],
    weight_range: tuple[int, int] = (2, 3),
    act_range: tuple[int, int] = (2, 3),
) -> Problem:
    """Random errors and sizes for layers reading ``inputs`` and writing ``outputs``."""
    points = list(dict.fromkeys([p for p in inputs.values() if p] + list(outputs.values())))
    weight_options, weight_bytes, macs = {}, {}, {}
    for layer in inputs:
        params = int(rng.integers(50, 2000))
        bits = _options(rng, WEIGHT_BITS, *weight_range)
        weight_options[layer] = {b: float(rng.random()) for b in bits}
        weight_bytes[layer] = {b: params * b / 8 + 4.0 * rng.integers(1, 16) for b in bits}
        macs[layer] = float(params * rng.integers(1, 64))
    act_options, act_bytes = {}, {}
    for point in points:
        size = int(rng.integers(100, 4000))
        bits = _options(rng, ACT_BITS, *act_range)
        act_options[point] = {b: float(rng.random()) for b in bits}
        act_bytes[point] = {b: size * b / 8 for b in bits}
    readers = {p: sum(1 for q in inputs.values() if q == p) for p in points}
    return Problem(
        weight_options=weight_options,
        act_options=act_options,
        layer_input=dict(inputs),
        weight_bytes=weight_bytes,
        act_bytes=act_bytes,
        macs=macs,
        readers=readers,
        steps=steps,
        fixed_bytes=float(rng.integers(0, 500)),
    )


def chain(rng: np.random.Generator, **ranges) -> Problem:
    """in -> L1 -> p1 -> L2 -> p2 -> L3 -> out."""
    inputs = {"L1": "in", "L2": "p1", "L3": "p2"}
    outputs = {"L1": "p1", "L2": "p2", "L3": "out"}
    steps = [frozenset(s) for s in (("in", "p1"), ("p1", "p2"), ("p2", "out"))]
    return _problem(rng, inputs, outputs, steps, **ranges)


def residual(rng: np.random.Generator, **ranges) -> Problem:
    """in -> A -> h; h -> B -> b; h -> C (shortcut) -> c; add(b, c) -> out (not quantizable)."""
    inputs = {"A": "in", "B": "h", "C": "h"}
    outputs = {"A": "h", "B": "b", "C": "c"}
    steps = [frozenset(s) for s in (("in", "h"), ("h", "b"), ("h", "b", "c"))]
    return _problem(rng, inputs, outputs, steps, **ranges)


def brute_force(problem: Problem) -> list[tuple[float, dict[str, float], dict, dict]]:
    """(error, costs, weight bits, act bits) of every choice."""
    layers, points = list(problem.weight_options), list(problem.act_options)
    out = []
    for wb in itertools.product(*(sorted(problem.weight_options[n]) for n in layers)):
        for ab in itertools.product(*(sorted(problem.act_options[p]) for p in points)):
            weight_bits, act_bits = (
                dict(zip(layers, wb, strict=True)),
                dict(zip(points, ab, strict=True)),
            )
            error = sum(problem.weight_options[n][b] for n, b in weight_bits.items())
            error += sum(problem.act_options[p][b] for p, b in act_bits.items())
            out.append((error, costs_of(problem, weight_bits, act_bits), weight_bits, act_bits))
    return out


def best(table, budgets) -> float | None:
    """The least error of a choice within ``budgets``, None when there is none."""
    errors = [e for e, c, _, _ in table if all(c[n] <= v * (1 + 1e-9) for n, v in budgets.items())]
    return min(errors) if errors else None


def between(table, name: str, fraction: float) -> float:
    """A budget ``fraction`` of the way from the least to the largest ``name`` of any choice."""
    values = [c[name] for _, c, _, _ in table]
    return min(values) + fraction * (max(values) - min(values))


def check_within(result: Allocation, problem: Problem, budgets: dict[str, float]) -> None:
    costs = costs_of(problem, result.weight_bits, result.act_bits)
    assert costs == result.costs
    for name, value in budgets.items():
        assert costs[name] <= value * (1 + 1e-9), (name, costs[name], value)


CASES = [
    {"weight_kb": 0.3},
    {"bops": 0.4},
    {"activation_kb": 0.5},
    {"total_kb": 0.35},
    {"memory_io_kb": 0.45},
    {"weight_kb": 0.6, "bops": 0.3},
    {"activation_kb": 0.4, "total_kb": 0.5},
    {},
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("fractions", CASES, ids=lambda c: "+".join(c) or "none")
def test_chain_matches_brute_force(seed: int, fractions: dict[str, float]) -> None:
    problem = chain(np.random.default_rng(seed))
    table = brute_force(problem)
    budgets = {n: between(table, n, f) for n, f in fractions.items()}
    result = allocate(problem, budgets)
    assert result.optimal
    assert result.error == pytest.approx(best(table, budgets), abs=1e-9)
    check_within(result, problem, budgets)


def test_residual_readers_share_bits_and_bops_use_them() -> None:
    problem = residual(np.random.default_rng(3), act_range=(3, 3))
    table = brute_force(problem)
    for fractions in ({"bops": 0.2}, {"bops": 0.5, "activation_kb": 0.5}, {"total_kb": 0.3}):
        budgets = {n: between(table, n, f) for n, f in fractions.items()}
        result = allocate(problem, budgets)
        assert result.error == pytest.approx(best(table, budgets), abs=1e-9)
        check_within(result, problem, budgets)
        h = result.act_bits["h"]
        bops = sum(problem.macs[n] * result.weight_bits[n] * h for n in ("B", "C"))
        bops += problem.macs["A"] * result.weight_bits["A"] * result.act_bits["in"]
        assert result.costs["bops"] == pytest.approx(bops, rel=1e-12)


def test_residual_consistency_binds() -> None:
    """B prefers its input at 16 bits, C at 4: the shared point must settle on one width for both."""
    problem = Problem(
        weight_options={"B": {8: 0.0}, "C": {8: 0.0}},
        act_options={"h": {4: 0.5, 16: 0.0}},
        layer_input={"B": "h", "C": "h"},
        weight_bytes={"B": {8: 100.0}, "C": {8: 100.0}},
        act_bytes={"h": {4: 50.0, 16: 200.0}},
        macs={"B": 1000.0, "C": 1.0e6},
        readers={"h": 2},
        steps=[frozenset({"h"})],
    )
    # 16 bits for both readers costs 8 x (1000 + 1e6) x 16 BOPs; for B only it would fit.
    budget = 8 * 1000 * 16 + 8 * 1.0e6 * 4
    result = allocate(problem, {"bops": budget})
    assert result.act_bits == {"h": 4}
    assert result.costs["bops"] == 8 * (1000 + 1.0e6) * 4
    assert allocate(problem, {}).act_bits == {"h": 16}


def test_never_exceeds_a_budget_and_is_optimal_on_random_problems() -> None:
    rng = np.random.default_rng(42)
    infeasible = 0
    for case in range(50):
        problem = (chain if case % 2 else residual)(rng, weight_range=(1, 3), act_range=(1, 3))
        table = brute_force(problem)
        names = rng.choice(BUDGETS, size=int(rng.integers(1, 4)), replace=False)
        budgets = {str(n): between(table, str(n), float(rng.uniform(-0.05, 0.8))) for n in names}
        budgets = {n: max(v, 0.0) for n, v in budgets.items()}
        expected = best(table, budgets)
        if expected is None:
            infeasible += 1
            with pytest.raises(InfeasibleBudget):
                allocate(problem, budgets)
            continue
        result = allocate(problem, budgets)
        check_within(result, problem, budgets)
        assert result.error == pytest.approx(expected, abs=1e-9)
    assert 0 < infeasible < 25


def test_infeasible_single_budget_names_the_smallest_feasible_value() -> None:
    problem = chain(np.random.default_rng(5))
    table = brute_force(problem)
    least = min(c["weight_kb"] for _, c, _, _ in table)
    with pytest.raises(InfeasibleBudget) as info:
        allocate(problem, {"weight_kb": 0.9 * least})
    message = str(info.value)
    assert "\n" not in message
    assert "weight_kb" in message and f"{least:.4g}"[:4] in message
    value = info.value.smallest["weight_kb"]
    assert value == pytest.approx(least, rel=1e-12)
    assert value == pytest.approx(smallest_feasible(problem, "weight_kb", {}), rel=1e-12)
    assert allocate(problem, {"weight_kb": value}).costs["weight_kb"] <= value * (1 + 1e-9)
    # the printed value (rounded up) is feasible as well
    printed = float(message.rsplit(" ", 1)[-1])
    allocate(problem, {"weight_kb": printed})
    with pytest.raises(InfeasibleBudget):
        allocate(problem, {"weight_kb": 0.99 * value})


@pytest.mark.parametrize("name", ["activation_kb", "bops", "total_kb", "memory_io_kb"])
def test_smallest_feasible_is_exactly_the_boundary(name: str) -> None:
    problem = residual(np.random.default_rng(8))
    table = brute_force(problem)
    other = "weight_kb" if name != "weight_kb" else "bops"
    budgets = {other: between(table, other, 0.4)}
    value = smallest_feasible(problem, name, budgets)
    assert value == pytest.approx(
        min(c[name] for _, c, _, _ in table if c[other] <= budgets[other]), rel=1e-12
    )
    allocate(problem, {**budgets, name: value})
    with pytest.raises(InfeasibleBudget) as info:
        allocate(problem, {**budgets, name: 0.99 * value})
    assert name in str(info.value)
    assert info.value.smallest[name] == pytest.approx(value, rel=1e-12)
    assert "with the other budgets as given" in str(info.value)


def test_two_budgets_that_conflict_are_both_named() -> None:
    """4-bit weights with many scales are bigger than 8-bit ones: weight_kb wants 8 bits, bops 4."""
    problem = Problem(
        weight_options={"L": {4: 1.0, 8: 0.0}},
        act_options={"p": {8: 0.0}},
        layer_input={"L": "p"},
        weight_bytes={"L": {4: 100.0, 8: 60.0}},
        act_bytes={"p": {8: 10.0}},
        macs={"L": 10.0},
        readers={"p": 1},
        steps=[frozenset({"p"})],
    )
    budgets = {"weight_kb": 80 / 1024, "bops": 10 * 6 * 8}
    with pytest.raises(InfeasibleBudget) as info:
        allocate(problem, budgets)
    message = str(info.value)
    assert message.startswith("budgets weight_kb=0.078125, bops=480 cannot be met together")
    assert info.value.smallest == {"weight_kb": 100 / 1024, "bops": 10 * 8 * 8}
    assert "smallest feasible weight_kb is 0.0976563" in message
    assert "smallest feasible bops is 640" in message
    for name, value in info.value.smallest.items():
        allocate(problem, {**budgets, name: value})


def test_budgets_each_below_their_minimum() -> None:
    problem = chain(np.random.default_rng(11))
    table = brute_force(problem)
    budgets = {"weight_kb": between(table, "weight_kb", -0.1), "bops": between(table, "bops", -0.1)}
    with pytest.raises(InfeasibleBudget, match="relaxing any single one of them is not enough"):
        allocate(problem, budgets)


def test_bad_budgets_are_config_errors() -> None:
    problem = chain(np.random.default_rng(0))
    with pytest.raises(
        ConfigError,
        match="valid budgets are weight_kb, activation_kb, total_kb, bops, memory_io_kb",
    ):
        allocate(problem, {"flash_kb": 3.0})
    with pytest.raises(ConfigError, match="valid budgets"):
        smallest_feasible(problem, "latency", {})
    with pytest.raises(ConfigError, match=">= 0"):
        allocate(problem, {"bops": -1.0})
    assert not issubclass(ConfigError, InfeasibleBudget)
    # an infinite budget is no budget
    assert allocate(problem, {"bops": float("inf")}).error == allocate(problem, {}).error


def test_malformed_problem_is_a_config_error() -> None:
    good = chain(np.random.default_rng(0))
    fields = dict(good.__dict__)
    with pytest.raises(ConfigError, match="has no act_options"):
        Problem(**{**fields, "layer_input": {**good.layer_input, "L2": "nowhere"}})
    with pytest.raises(ConfigError, match="weight_bytes"):
        Problem(**{**fields, "weight_bytes": {**good.weight_bytes, "L1": {}}})
    with pytest.raises(ConfigError, match="not one of its options"):
        costs_of(
            good,
            {n: 5 for n in good.weight_options},
            {p: min(o) for p, o in good.act_options.items()},
        )


def test_ties_go_to_more_bits_within_budget() -> None:
    problem = Problem(
        weight_options={"L": {4: 0.0, 8: 0.0, 16: 0.0}},
        act_options={"p": {8: 0.0, 16: 0.0}},
        layer_input={"L": "p"},
        weight_bytes={"L": {4: 50.0, 8: 100.0, 16: 200.0}},
        act_bytes={"p": {8: 10.0, 16: 20.0}},
        macs={"L": 10.0},
        readers={"p": 1},
        steps=[frozenset({"p"})],
    )
    assert allocate(problem, {}).weight_bits == {"L": 16}
    assert allocate(problem, {"weight_kb": 150 / 1024}).weight_bits == {"L": 8}


def test_forty_layers_solve() -> None:
    rng = np.random.default_rng(7)
    layers = [f"L{i}" for i in range(40)]
    inputs = {name: ("in" if i == 0 else f"p{i}") for i, name in enumerate(layers)}
    outputs = {name: f"p{i + 1}" for i, name in enumerate(layers)}
    steps = [frozenset({inputs[name], outputs[name]}) for name in layers]
    problem = _problem(rng, inputs, outputs, steps, weight_range=(5, 5), act_range=(3, 3))
    lows = smallest_feasible(problem, "weight_kb", {}), smallest_feasible(problem, "bops", {})
    budgets = {"weight_kb": 1.5 * lows[0], "bops": 1.5 * lows[1], "activation_kb": 8.0}
    result = allocate(problem, budgets)
    assert result.optimal
    check_within(result, problem, budgets)


def test_budgets_a_hair_below_a_choice_are_not_exceeded() -> None:
    """HiGHS' feasibility tolerance (~1e-7) may accept a choice 1e-8 over budget; allocate re-solves."""
    problem = chain(np.random.default_rng(2))
    table = brute_force(problem)
    for name in ("weight_kb", "bops", "memory_io_kb"):
        # the unconstrained best choice exceeds this budget by 1e-8 of it
        budgets = {name: allocate(problem, {}).costs[name] * (1 - 1e-8)}
        result = allocate(problem, budgets)
        check_within(result, problem, budgets)
        assert result.error == pytest.approx(best(table, budgets), abs=1e-9)

"""Mixed-precision bit allocation: the exact integer program that picks per-layer bit-widths under budgets.

Pure numbers in, choice out. For every quantizable layer a weight bit-width and
for every activation point (tensor) an activation bit-width are chosen so that
the summed sensitivity (error) is minimal while every given budget holds:

``weight_kb``
    weight bytes of the layers at their bits, plus ``Problem.fixed_bytes``.
``activation_kb``
    peak activation memory: the largest, over execution steps, summed bytes of
    the points live at that step.
``total_kb``
    weight bytes (with ``fixed_bytes``) plus the peak activation bytes.
``bops``
    sum over layers of MACs x weight bits x input bits (32 for a float input).
``memory_io_kb``
    weight bytes (with ``fixed_bytes``) plus, for every point, its bytes x
    (1 write + its reads).

Every ``*_kb`` quantity is in KiB: 1 kb = 1024 bytes.

The program is linear and exact. A binary ``x[l, w, a]`` says layer ``l`` has
``w`` weight bits while its input point has ``a`` bits (BOPs need the product
``w * a``, hence the joint variable); a binary ``y[p, a]`` says point ``p`` has
``a`` bits. ``sum_a y[p, a] = 1`` and ``sum_w x[l, w, a] = y[input(l), a]``, so
every layer reading a point sees the same bits. Peak memory is a continuous
``M`` at least the live bytes of every step, added only when ``activation_kb``
or ``total_kb`` is asked for. ``scipy.optimize.milp`` (HiGHS) solves it with a
zero relative gap; the objective is shifted and scaled (largest coefficient
1e3) so that HiGHS' fixed absolute gap of 1e-6 is negligible, and budget rows
are scaled to coefficients of at most 1. A budget row allows ``REL_TOL`` (1e-9)
of slack for float rounding; every solution is checked against the budgets with
``costs_of`` and, should HiGHS' own feasibility tolerance (~1e-7) let it
overshoot, solved again with a tighter budget (see ``allocate``).

HiGHS status handling: optimal -> the choice; time limit with a feasible
choice -> that choice with ``Allocation.optimal`` False; time limit without
one -> ConfigError; infeasible -> InfeasibleBudget with a diagnosis;
"unbounded or infeasible" from presolve -> solved once more without presolve
(the program is bounded); anything else -> ConfigError with HiGHS' message.

Ties (equal summed error) are settled in two deterministic steps: HiGHS is
deterministic, and afterwards a greedy pass moves any layer or point to more
bits of exactly the same error, as long as every budget still holds (layers
first, then points, each in the problem's order, highest bits first). More
bits at no measured cost is the safer choice; no epsilon is added to the
objective, so the error stays exactly optimal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from decimal import ROUND_CEILING, Decimal

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from tinyptq.errors import ConfigError

BUDGETS = ("weight_kb", "activation_kb", "total_kb", "bops", "memory_io_kb")
KIB = 1024.0
FLOAT_INPUT_BITS = 32  # the bits a layer reading a float input (no point) sees
REL_TOL = 1e-9  # a cost may exceed its budget by this fraction only (float rounding)

_UNIT = {"weight_kb": KIB, "activation_kb": KIB, "total_kb": KIB, "bops": 1.0, "memory_io_kb": KIB}
_PEAK = ("activation_kb", "total_kb")  # the quantities that need the peak variable M
_OBJECTIVE_SCALE = 1e3  # largest objective coefficient, so HiGHS' absolute gap (1e-6) is negligible
_RETRIES = 4  # solves with ever tighter budgets when the solver's tolerance overshoots one


@dataclass(frozen=True)
class Problem:
    """The numbers of one allocation problem; checked on construction (ConfigError).

    ``weight_options`` maps each layer to ``{bits: error}`` (a one-key dict fixes
    it), ``act_options`` each activation point likewise. ``layer_input`` names
    the point each layer reads (None: a float input of 32 bits).
    ``weight_bytes`` / ``act_bytes`` give bytes at each bit-width, ``macs`` the
    MACs of each layer, ``readers`` how often each point is read per inference
    (a point left out is read 0 times), ``steps`` the points live at each
    execution step, ``fixed_bytes`` the weight bytes that do not depend on the
    choice.
    """

    weight_options: dict[str, dict[int, float]]
    act_options: dict[str, dict[int, float]]
    layer_input: dict[str, str | None]
    weight_bytes: dict[str, dict[int, float]]
    act_bytes: dict[str, dict[int, float]]
    macs: dict[str, float]
    readers: dict[str, int]
    steps: list[frozenset[str]]
    fixed_bytes: float = 0.0

    def __post_init__(self) -> None:
        _check_problem(self)


@dataclass(frozen=True)
class Allocation:
    """The chosen bits, their summed error and every budget quantity (``costs``, keys ``BUDGETS``).

    ``optimal`` is False only when the time limit stopped the solver with a
    feasible but unproven allocation.
    """

    weight_bits: dict[str, int]
    act_bits: dict[str, int]
    error: float
    costs: dict[str, float]
    optimal: bool = True

    def to_dict(self) -> dict:
        """Plain data for JSON."""
        return asdict(self)


class InfeasibleBudget(ConfigError):
    """The budgets cannot be met; ``smallest`` maps each binding budget to its smallest feasible value."""

    def __init__(self, message: str, smallest: Mapping[str, float] | None = None) -> None:
        super().__init__(message)
        self.smallest: dict[str, float] = dict(smallest or {})


# ---------------------------------------------------------------------------- checks


def _fail(message: str) -> None:
    raise ConfigError(message)


def _check_options(kind: str, table: Mapping[str, Mapping[int, float]]) -> None:
    for name, options in table.items():
        if not options:
            _fail(f"{kind} {name!r} has no bit-width options")
        for bits, err in options.items():
            if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or bits < 1:
                _fail(f"{kind} {name!r}: bit-width {bits!r} is not a positive integer")
            if not math.isfinite(err) or err < 0:
                _fail(f"{kind} {name!r}: error {err!r} at {bits} bits must be finite and >= 0")


def _check_keys(what: str, table: Mapping, names: Mapping, kind: str) -> None:
    missing = [n for n in names if n not in table]
    extra = [n for n in table if n not in names]
    if missing:
        _fail(f"{what} lacks {kind} {missing[0]!r}")
    if extra:
        _fail(f"{what} names {extra[0]!r}, which is not a {kind} of the problem")


def _check_bytes(what: str, table: Mapping[str, Mapping[int, float]], options: Mapping) -> None:
    _check_keys(what, table, options, "layer" if what == "weight_bytes" else "point")
    for name, opts in options.items():
        for bits in opts:
            value = table[name].get(bits)
            if value is None or not math.isfinite(value) or value < 0:
                _fail(f"{what}[{name!r}] needs bytes >= 0 at {bits} bits, got {value!r}")


def _check_problem(p: Problem) -> None:
    if not p.weight_options:
        _fail("the allocation problem has no layers")
    _check_options("layer", p.weight_options)
    _check_options("point", p.act_options)
    _check_keys("layer_input", p.layer_input, p.weight_options, "layer")
    for layer, point in p.layer_input.items():
        if point is not None and point not in p.act_options:
            _fail(f"layer {layer!r} reads point {point!r}, which has no act_options")
    _check_bytes("weight_bytes", p.weight_bytes, p.weight_options)
    _check_bytes("act_bytes", p.act_bytes, p.act_options)
    _check_keys("macs", p.macs, p.weight_options, "layer")
    if any(not math.isfinite(m) or m < 0 for m in p.macs.values()):
        _fail("macs must be finite and >= 0")
    for point, reads in p.readers.items():
        if point not in p.act_options:
            _fail(f"readers names {point!r}, which is not a point of the problem")
        if reads < 0:
            _fail(f"readers[{point!r}] = {reads} must be >= 0")
    for i, step in enumerate(p.steps):
        unknown = sorted(set(step) - set(p.act_options))
        if unknown:
            _fail(f"step {i} lists point {unknown[0]!r}, which is not a point of the problem")
    if not math.isfinite(p.fixed_bytes) or p.fixed_bytes < 0:
        _fail(f"fixed_bytes = {p.fixed_bytes!r} must be finite and >= 0")


def _check_budgets(budgets: Mapping[str, float]) -> dict[str, float]:
    """The finite budgets in ``BUDGETS`` order (an infinite one is no budget); ConfigError on bad ones."""
    values: dict[str, float] = {}
    for name, value in budgets.items():
        if name not in BUDGETS:
            raise ConfigError(f"unknown budget {name!r}; valid budgets are {', '.join(BUDGETS)}")
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"budget {name}={value!r} is not a number") from None
        if math.isnan(v) or v < 0:
            raise ConfigError(f"budget {name}={value!r} must be a number >= 0")
        if not math.isinf(v):
            values[name] = v
    return {n: values[n] for n in BUDGETS if n in values}


def _within(cost: float, budget: float) -> bool:
    return cost <= budget + REL_TOL * abs(budget)


# ---------------------------------------------------------------------------- costs


def costs_of(
    problem: Problem, weight_bits: Mapping[str, int], act_bits: Mapping[str, int]
) -> dict[str, float]:
    """Every budget quantity (keys ``BUDGETS``; kb in KiB) of one choice of bits; ConfigError if not a choice."""
    for what, bits, options in (
        ("weight_bits", weight_bits, problem.weight_options),
        ("act_bits", act_bits, problem.act_options),
    ):
        _check_keys(what, bits, options, "layer" if what == "weight_bits" else "point")
        for name, b in bits.items():
            if b not in options[name]:
                _fail(f"{what}[{name!r}] = {b!r} is not one of its options {sorted(options[name])}")
    weights = problem.fixed_bytes + sum(problem.weight_bytes[n][b] for n, b in weight_bits.items())
    act = {p: problem.act_bytes[p][b] for p, b in act_bits.items()}
    peak = max((sum(act[p] for p in step) for step in problem.steps), default=0.0)
    bops = 0.0
    for layer, w in weight_bits.items():
        point = problem.layer_input[layer]
        bops += problem.macs[layer] * w * (FLOAT_INPUT_BITS if point is None else act_bits[point])
    io = weights + sum(b * (1 + problem.readers.get(p, 0)) for p, b in act.items())
    return {
        "weight_kb": weights / KIB,
        "activation_kb": peak / KIB,
        "total_kb": (weights + peak) / KIB,
        "bops": float(bops),
        "memory_io_kb": io / KIB,
    }


def _error_of(
    problem: Problem, weight_bits: Mapping[str, int], act_bits: Mapping[str, int]
) -> float:
    return float(
        sum(problem.weight_options[n][b] for n, b in weight_bits.items())
        + sum(problem.act_options[p][b] for p, b in act_bits.items())
    )


# ---------------------------------------------------------------------------- the program


@dataclass
class _Index:
    """Column numbers of the variables: x[l, w, a], y[p, a] and the peak M (or None)."""

    x: dict[tuple[str, int, int], int] = field(default_factory=dict)
    y: dict[tuple[str, int], int] = field(default_factory=dict)
    peak: int | None = None
    size: int = 0

    def new(self) -> int:
        self.size += 1
        return self.size - 1


def _input_bits(problem: Problem, layer: str) -> list[int]:
    point = problem.layer_input[layer]
    return [FLOAT_INPUT_BITS] if point is None else sorted(problem.act_options[point])


def _index(problem: Problem, with_peak: bool) -> _Index:
    idx = _Index()
    for layer, options in problem.weight_options.items():
        for w in sorted(options):
            for a in _input_bits(problem, layer):
                idx.x[layer, w, a] = idx.new()
    for point, options in problem.act_options.items():
        for a in sorted(options):
            idx.y[point, a] = idx.new()
    if with_peak:
        idx.peak = idx.new()
    return idx


def _quantity(problem: Problem, idx: _Index, name: str) -> tuple[dict[int, float], float]:
    """Budget quantity ``name`` in bytes (or BOPs) as linear coefficients over columns, plus a constant."""
    coef: dict[int, float] = {}
    const = 0.0
    if name in ("weight_kb", "total_kb", "memory_io_kb"):
        const = problem.fixed_bytes
        for (layer, w, _a), col in idx.x.items():
            coef[col] = problem.weight_bytes[layer][w]
    if name in _PEAK:
        coef[idx.peak] = 1.0
    if name == "memory_io_kb":
        for (point, a), col in idx.y.items():
            coef[col] = problem.act_bytes[point][a] * (1 + problem.readers.get(point, 0))
    if name == "bops":
        for (layer, w, a), col in idx.x.items():
            coef[col] = problem.macs[layer] * w * a
    return coef, const


def _objective(problem: Problem, idx: _Index, minimize: str | None) -> np.ndarray:
    """The summed error (``minimize`` None) or a budget quantity, shifted and scaled for HiGHS.

    Exactly one x of a layer and one y of a point is 1, so subtracting each
    group's smallest coefficient only shifts the objective by a constant.
    """
    c = np.zeros(idx.size)
    if minimize is None:
        for (layer, w, _a), col in idx.x.items():
            c[col] = problem.weight_options[layer][w]
        for (point, a), col in idx.y.items():
            c[col] = problem.act_options[point][a]
    else:
        for col, value in _quantity(problem, idx, minimize)[0].items():
            c[col] = value
    groups: dict[str, list[int]] = {}
    for (layer, _w, _a), col in idx.x.items():
        groups.setdefault(f"l:{layer}", []).append(col)
    for (point, _a), col in idx.y.items():
        groups.setdefault(f"p:{point}", []).append(col)
    for cols in groups.values():
        c[cols] -= c[cols].min()
    top = float(np.max(c, initial=0.0))
    return c * (_OBJECTIVE_SCALE / top) if top > 0 else c


Choice = tuple[dict[str, int], dict[str, int], bool]  # weight bits, act bits, proven optimal


def _solve(
    problem: Problem, budgets: Mapping[str, float], minimize: str | None, time_limit: float
) -> Choice | None:
    """The best choice under ``budgets`` (validated, finite), or None when none exists."""
    idx = _index(problem, any(n in _PEAK for n in budgets) or minimize in _PEAK)
    rows: list[tuple[dict[int, float], float, float]] = []
    for point, options in problem.act_options.items():
        rows.append(({idx.y[point, a]: 1.0 for a in options}, 1.0, 1.0))
    for layer, options in problem.weight_options.items():
        point = problem.layer_input[layer]
        for a in _input_bits(problem, layer):
            row = {idx.x[layer, w, a]: 1.0 for w in options}
            if point is None:
                rows.append((row, 1.0, 1.0))
            else:
                row[idx.y[point, a]] = -1.0
                rows.append((row, 0.0, 0.0))
    if idx.peak is not None:
        for step in problem.steps:
            row = {
                idx.y[p, a]: problem.act_bytes[p][a] for p in step for a in problem.act_options[p]
            }
            row[idx.peak] = -1.0
            rows.append((row, -np.inf, 0.0))
    for name, budget in budgets.items():
        coef, const = _quantity(problem, idx, name)
        rhs = budget * (1 + REL_TOL) * _UNIT[name] - const  # the tolerance _within grants
        scale = max((abs(v) for v in coef.values()), default=0.0)
        if scale == 0:
            if rhs < 0:
                return None
            continue
        rows.append(({k: v / scale for k, v in coef.items()}, -np.inf, rhs / scale))

    r, cols, vals = [], [], []
    for i, (row, _lo, _hi) in enumerate(rows):
        r += [i] * len(row)
        cols += list(row)
        vals += list(row.values())
    matrix = csr_array((vals, (r, cols)), shape=(len(rows), idx.size))
    lower = np.array([lo for _, lo, _ in rows])
    upper = np.array([hi for _, _, hi in rows])
    integrality = np.ones(idx.size)
    ub = np.ones(idx.size)
    if idx.peak is not None:
        integrality[idx.peak] = 0
        ub[idx.peak] = np.inf
    c = _objective(problem, idx, minimize)
    res = None
    for presolve in (True, False):
        res = milp(
            c,
            integrality=integrality,
            bounds=Bounds(np.zeros(idx.size), ub),
            constraints=LinearConstraint(matrix, lower, upper),
            options={"time_limit": float(time_limit), "mip_rel_gap": 0.0, "presolve": presolve},
        )
        # presolve may answer "unbounded or infeasible" (status 4); the program is bounded,
        # so one solve without presolve gives the definite answer.
        if res.status != 4:
            break
    if res.status == 2:
        return None
    if res.x is None:
        if res.status == 1:
            raise ConfigError(
                f"no allocation found within time_limit={time_limit:g} s; raise the time limit"
            )
        raise ConfigError(f"the allocation solver failed: {res.message.splitlines()[0]}")
    x = res.x
    weight_bits = {
        layer: max(
            ((w, a) for w in sorted(opts) for a in _input_bits(problem, layer)),
            key=lambda k: x[idx.x[layer, *k]],
        )[0]
        for layer, opts in problem.weight_options.items()
    }
    act_bits = {
        point: max(sorted(opts), key=lambda a: x[idx.y[point, a]])
        for point, opts in problem.act_options.items()
    }
    return weight_bits, act_bits, res.status == 0


# ---------------------------------------------------------------------------- ties and diagnosis


def _raise_ties(
    problem: Problem,
    weight_bits: dict[str, int],
    act_bits: dict[str, int],
    budgets: Mapping[str, float],
) -> None:
    """Raise, in place, layers and points to more bits of the same error while every budget holds."""
    groups = [(weight_bits, problem.weight_options, n) for n in problem.weight_options]
    groups += [(act_bits, problem.act_options, n) for n in problem.act_options]
    changed = True
    while changed:
        changed = False
        for bits, options, name in groups:
            current = bits[name]
            for b in sorted(options[name], reverse=True):
                if b <= current:
                    break
                if options[name][b] != options[name][current]:
                    continue
                bits[name] = b
                costs = costs_of(problem, weight_bits, act_bits)
                if all(_within(costs[n], v) for n, v in budgets.items()):
                    changed = True
                    break
                bits[name] = current


def _ceil_text(value: float, digits: int = 6) -> str:
    """``value`` to ``digits`` significant digits, rounded up (so the printed budget is feasible)."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    d = Decimal(value)
    up = d.quantize(Decimal(1).scaleb(d.adjusted() - digits + 1), rounding=ROUND_CEILING)
    return f"{float(up):.{digits}g}"


def _text(budgets: Mapping[str, float]) -> str:
    return ", ".join(f"{n}={v:g}" for n, v in budgets.items())


def _diagnose(
    problem: Problem, budgets: Mapping[str, float], time_limit: float
) -> InfeasibleBudget:
    """Why ``budgets`` cannot be met: each budget still violated at its minimum with the others as given."""
    smallest: dict[str, float] = {}
    for name, budget in budgets.items():
        others = {k: v for k, v in budgets.items() if k != name}
        choice = _solve(problem, others, name, time_limit)
        if choice is not None:
            value = costs_of(problem, choice[0], choice[1])[name]
            if not _within(value, budget):
                smallest[name] = value
    given = _text(budgets)
    head = (
        f"budget {given} cannot be met"
        if len(budgets) == 1
        else f"budgets {given} cannot be met together"
    )
    if not smallest and len(budgets) == 1:  # the solver's tolerance, not the budget, failed
        return InfeasibleBudget(f"{head} within the solver's tolerance; relax it slightly")
    if not smallest:
        return InfeasibleBudget(f"{head}; relaxing any single one of them is not enough")
    tail = " and ".join(
        f"the smallest feasible {n} is {_ceil_text(v)}" for n, v in smallest.items()
    )
    note = " (with the other budgets as given)" if len(budgets) > 1 else ""
    return InfeasibleBudget(f"{head}; {tail}{note}", smallest)


# ---------------------------------------------------------------------------- public


def allocate(problem: Problem, budgets: Mapping[str, float], time_limit: float = 60) -> Allocation:
    """The bits of least summed error within every budget (names ``BUDGETS``; kb = 1024 bytes).

    Raises ConfigError for an unknown or negative budget, InfeasibleBudget
    (naming the binding budgets and their smallest feasible values) when no
    choice meets them. The result never exceeds a budget by more than
    ``REL_TOL`` (float rounding): when the solver's feasibility tolerance
    (about 1e-7 of a budget) lets a choice overshoot, the budget is tightened
    by 10, 100, ... times the overshoot and the program solved again; a better
    choice within that sliver below the budget is then given up.
    ``time_limit`` (seconds) bounds each solve; when it stops the solver with a
    feasible choice, the result has ``optimal=False``.
    """
    given = _check_budgets(budgets)
    tight = dict(given)
    for attempt in range(_RETRIES):
        choice = _solve(problem, tight, None, time_limit)
        if choice is None:  # also when only an overshooting choice existed
            raise _diagnose(problem, given, time_limit)
        weight_bits, act_bits, optimal = choice
        costs = costs_of(problem, weight_bits, act_bits)
        over = {n: costs[n] - b for n, b in given.items() if not _within(costs[n], b)}
        if not over:
            break
        for n, excess in over.items():
            tight[n] = given[n] - excess * 10 ** (attempt + 1)
    else:
        raise _diagnose(problem, given, time_limit)
    _raise_ties(problem, weight_bits, act_bits, given)
    return Allocation(
        weight_bits=weight_bits,
        act_bits=act_bits,
        error=_error_of(problem, weight_bits, act_bits),
        costs=costs_of(problem, weight_bits, act_bits),
        optimal=optimal,
    )


def smallest_feasible(
    problem: Problem, name: str, budgets: Mapping[str, float], time_limit: float = 60
) -> float:
    """The least value of budget quantity ``name`` (kb in KiB) any choice reaches within the other budgets.

    ``budgets[name]``, if given, is ignored. The value is that of an actual
    choice, so ``allocate`` with exactly this budget succeeds. Raises
    InfeasibleBudget when the other budgets cannot be met themselves.
    """
    if name not in BUDGETS:
        raise ConfigError(f"unknown budget {name!r}; valid budgets are {', '.join(BUDGETS)}")
    others = {k: v for k, v in _check_budgets(budgets).items() if k != name}
    choice = _solve(problem, others, name, time_limit)
    if choice is None:
        raise _diagnose(problem, others, time_limit)
    return costs_of(problem, choice[0], choice[1])[name]

"""The contract every registered stage keeps, on a Keras graph and on the same model as ONNX.

The stages come from ``tinyptq.pipeline.registry()``, so a stage added later is
covered without touching this file. Each one runs on the state it needs: a
minimal valid prefix computed from the stages' ``requires`` / ``precedes``
declarations (and checked with ``order_problem``). Then:

1. ``apply`` never mutates its input state (graph, encodings, fixed weights,
   BN statistics, config, log, calibration data);
2. ``get_params`` round-trips through ``create_stage`` (defaults and one
   non-default set of options);
3. the same seed gives the same result: graph, encodings (bitwise), fixed
   weights and BN statistics;
4. the output state (with ``range_setting`` after it when the stage comes
   before ``range_setting``) exports to QDQ ONNX + encodings JSON, and the QDQ
   model runs in onnxruntime with finite outputs;
5. the stage's ``name`` is its registry key, and ``apply`` returns a new PTQState.

Each stage runs in two variants: default options after its minimal prefix,
and its non-default options after the full prefix (every other stage that may
come before it), so that more of its code paths are held to the contract.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from tinyptq._tf import keras
from tinyptq.config import QuantConfig
from tinyptq.export import export_state
from tinyptq.graph.keras_graph import KerasGraph
from tinyptq.graph.onnx_graph import OnnxGraph
from tinyptq.pipeline import PTQState, Stage, create_stage, order_problem, registry

SEED = 7
RANGE = "range_setting"  # the stage every pipeline needs (order_problem's own rule)
CONFIG = QuantConfig(weight_bits=4, act_bits=8, weight_per_channel=True)
INPUT_SHAPE = (12, 12, 3)
GRAPH_KINDS = ("keras", "onnx")


# ------------------------------------------------------------------ model
def tiny_model(seed: int = SEED) -> Any:
    """conv-BN-ReLU, depthwise-BN-ReLU + pointwise-BN, residual Add + ReLU, GAP, dense-ReLU, dense.

    About 2,900 parameters, all (BN statistics included) drawn from a seeded
    generator. The hidden dense layer gives CLE a pair without batch norms, so
    that it has work to do even without bn_folding before it.
    """
    inp = keras.Input(INPUT_SHAPE, name="img")
    x = keras.layers.Conv2D(24, 3, padding="same", name="conv")(inp)
    x = keras.layers.BatchNormalization(name="conv_bn")(x)
    skip = keras.layers.ReLU(name="conv_relu")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(skip)
    x = keras.layers.BatchNormalization(name="dw_bn")(x)
    x = keras.layers.ReLU(name="dw_relu")(x)
    x = keras.layers.Conv2D(24, 1, use_bias=False, name="pw")(x)
    x = keras.layers.BatchNormalization(name="pw_bn")(x)
    x = keras.layers.Add(name="add")([skip, x])
    x = keras.layers.ReLU(name="add_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(32, activation="relu", name="fc1")(x)
    x = keras.layers.Dense(10, name="fc2")(x)
    model = keras.Model(inp, x, name="contract_net")
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            c = weights[0].shape[0]
            new = [
                rng.uniform(0.5, 1.5, c),
                rng.normal(0, 0.3, c),
                rng.normal(0, 0.3, c),
                rng.uniform(0.3, 2.0, c),
            ]
        else:
            kernel = weights[0]
            depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
            fan_in = int(np.prod(kernel.shape[:2] if depthwise else kernel.shape[:-1]))
            new = [rng.normal(0, np.sqrt(2.0 / fan_in), kernel.shape)]
            new += [rng.normal(0, 0.1, w.shape) for w in weights[1:]]
        layer.set_weights([np.asarray(w, np.float32) for w in new])
    return model


@pytest.fixture(scope="session")
def graphs() -> dict[str, Any]:
    """The tiny model as a KerasGraph and as an OnnxGraph of its ONNX export."""
    keras_graph = KerasGraph.from_keras(tiny_model())
    return {"keras": keras_graph, "onnx": OnnxGraph.from_onnx(keras_graph.to_onnx().model)}


@pytest.fixture(scope="session")
def calib() -> np.ndarray:
    """64 seeded calibration images (NHWC, as both graphs take them)."""
    return np.random.default_rng(SEED).normal(size=(64, *INPUT_SHAPE)).astype(np.float32)


# ------------------------------------------------------ order of the stages
def requirements(name: str) -> set[str]:
    """Every stage ``name`` needs before it, transitively."""
    stages, out, todo = registry(), set(), [name]
    while todo:
        for req in stages[todo.pop()].requires:
            if req not in out:
                out.add(req)
                todo.append(req)
    return out


def constraint_order(names: set[str]) -> list[str]:
    """``names`` in an order that keeps every requires / precedes declaration among them."""
    stages = registry()
    after: dict[str, set[str]] = {n: set() for n in names}  # n -> stages that must come after n
    for n in names:
        for req in stages[n].requires:
            if req in names:
                after[req].add(n)
        for later in stages[n].precedes:
            if later in names:
                after[n].add(later)
    order: list[str] = []
    left = set(names)
    while left:
        free = sorted(n for n in left if not any(n in after[m] for m in left))
        if not free:
            raise AssertionError(
                f"requires / precedes declarations form a cycle among {sorted(left)}"
            )
        order.append(free[0])
        left.remove(free[0])
    return order


def forced_after(name: str) -> set[str]:
    """Stages that can only come after ``name``.

    Those it precedes, those requiring it, and transitively what any of them
    precedes and what requires any of them.
    """
    stages, out = registry(), set(registry()[name].precedes)
    while True:
        later = out | {name}
        new = {s for s, cls in stages.items() if set(cls.requires) & later}
        new |= {p for s in out for p in stages[s].precedes}
        if new <= later:
            return out - {name}
        out |= new


def plan(name: str, full: bool = False) -> tuple[list[str], list[str]]:
    """(prefix, suffix): the stages to run before ``name``, and after it so that its state exports.

    The prefix is the fewest stages ``name`` needs, or (``full``) every other
    registered stage that may come before it.
    """
    before = requirements(name)
    if full:
        stages = registry()
        # one rounding stage per pipeline (and a fast test): rounding stages stay out of prefixes
        rounding = {s for s, cls in stages.items() if cls.rounds_weights}
        before |= set(stages) - forced_after(name) - {name} - rounding
    prefix = constraint_order(before)
    suffix: list[str] = []
    if RANGE not in prefix and name != RANGE:
        done = set(prefix) | {name}
        suffix = [s for s in constraint_order(requirements(RANGE) | {RANGE}) if s not in done]
    return prefix, suffix


# ------------------------------------------------------------ option sets
# string options whose other valid values cannot be derived from the default
_OTHER_STRINGS = {
    ("range_setting", "weights"): "mse",
    ("range_setting", "activations"): "percentile",
    ("bias_correction", "method"): "analytical",
    ("adaround", "input_from"): "float",
    ("brecq", "loss"): "fisher",
    ("mixed_precision", "sensitivity"): "kl",
}
# options held small in every variant: reconstruction learns 2000 iterations per layer by default
QUICK = {"iterations": 4}
# options a stage cannot run without, in every variant: mixed precision needs a budget the
# contract model can meet (the other budgets stay unset: small ones would be infeasible)
REQUIRED = {"mixed_precision": {"weight_kb": 3.0}}


def _candidates(stage: str, option: str, param: inspect.Parameter) -> list[Any]:
    """Non-default values to try for one option, most telling first."""
    default, note = param.default, str(param.annotation)
    if stage in REQUIRED and default is None:  # budgets: the required one only
        return []
    if (stage, option) in _OTHER_STRINGS:
        return [_OTHER_STRINGS[stage, option]]
    if isinstance(default, bool):
        return [not default]
    if isinstance(default, int):
        # a quarter first: batch sizes below the 64 samples give several batches
        return [max(1, default // 4), default * 2, default + 1]
    if isinstance(default, float):
        return [default / 2, default * 2, round(default * 0.999, 4)]
    if default is None and "int" in note:
        return [128, 8, 2]
    if default is None and "float" in note:
        return [0.5, 2.0]
    return []


def custom_options(name: str) -> dict[str, Any]:
    """One valid set of non-default options of stage ``name`` (empty when none can be set)."""
    cls = registry()[name]
    sig = inspect.signature(cls.__init__)
    accepted: dict[str, Any] = {}
    for option in cls.param_names():
        for value in _candidates(name, option, sig.parameters[option]):
            try:
                create_stage(name, {option: value})
            except Exception:  # any rejection means "try the next value"
                continue
            accepted[option] = value
            break
    try:
        create_stage(name, accepted)
    except Exception:  # options valid one by one but not together
        return dict([next(iter(accepted.items()))])
    return accepted


def quick(name: str) -> dict[str, Any]:
    """The QUICK options that stage ``name`` takes, and the ones it requires."""
    return {**{k: v for k, v in QUICK.items() if k in registry()[name].param_names()}, **REQUIRED.get(name, {})}


STAGE_NAMES = sorted(registry())
OPTION_SETS = {name: {"default": quick(name), "custom": {**custom_options(name), **quick(name)}} for name in STAGE_NAMES}
OPTION_CASES = [
    pytest.param(name, kind, id=f"{name}-{kind}")
    for name in STAGE_NAMES
    for kind in ("default", "custom")
    if kind == "default" or OPTION_SETS[name]["custom"]
]
# how each stage runs: default options after its minimal prefix, and its
# non-default options after the full prefix (so that, e.g., cle and
# bias_correction also see folded batch norms)
VARIANTS = {"minimal": ("default", False), "full": ("custom", True)}
RUN_CASES = [
    pytest.param(name, variant, graph, id=f"{name}-{variant}-{graph}")
    for name in STAGE_NAMES
    for variant in VARIANTS
    if variant == "minimal" or OPTION_SETS[name]["custom"] or plan(name, True) != plan(name)
    for graph in GRAPH_KINDS
]


# ------------------------------------------------------- state snapshots
def _array_key(value: Any) -> tuple[str, tuple[int, ...], bytes]:
    a = np.ascontiguousarray(value)
    return a.dtype.str, a.shape, a.tobytes()


def _encodings(encodings: dict[str, Any]) -> dict[str, tuple]:
    return {
        name: (
            e.bits,
            _array_key(e.scale),
            _array_key(e.zero_point),
            e.signed,
            e.symmetric,
            e.narrow_range,
            e.axis,
        )
        for name, e in encodings.items()
    }


def _nested(value: Any) -> Any:
    """A comparable value of nested dicts / lists of arrays and scalars (arrays by their bytes)."""
    if isinstance(value, dict):
        return {k: _nested(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nested(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return _array_key(value)
    return value


def snapshot(state: PTQState, log_details: bool = True) -> dict[str, Any]:
    """Everything a stage could change in a state, as comparable plain data."""
    log: list[Any] = [r.stage for r in state.log]  # lines and details may hold timings
    if log_details:
        log = [
            (r.stage, repr(r.params), r.seconds, list(r.lines), repr(r.details)) for r in state.log
        ]
    return {
        "graph": state.graph.fingerprint(),
        "weight_encodings": _encodings(state.weight_encodings),
        "act_encodings": _encodings(state.act_encodings),
        "fixed_weights": {k: _array_key(v) for k, v in state.fixed_weights.items()},
        "bn_stats": _nested(state.bn_stats),
        "config": state.config.to_dict(),
        "log": log,
        "calib": (
            state.calib.dtype.str,
            state.calib.shape,
            hashlib.sha256(state.calib.tobytes()).hexdigest(),
        ),
        "seed": state.seed,
    }


def clone(state: PTQState) -> PTQState:
    """An equal state sharing nothing mutable with ``state``."""
    return PTQState(
        graph=state.graph.copy(),
        config=copy.deepcopy(state.config),
        calib=np.array(state.calib, copy=True),
        weight_encodings=copy.deepcopy(state.weight_encodings),
        act_encodings=copy.deepcopy(state.act_encodings),
        fixed_weights={k: np.array(v, copy=True) for k, v in state.fixed_weights.items()},
        bn_stats=copy.deepcopy(state.bn_stats),
        log=copy.deepcopy(state.log),
        seed=state.seed,
    )


def diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Names of the snapshot entries (and of the tensors inside them) that differ."""
    out = []
    for key in a:
        if a[key] == b[key]:
            continue
        if isinstance(a[key], dict) and isinstance(b[key], dict):
            names = sorted(set(a[key]) | set(b[key]))
            out.append(f"{key}: " + ", ".join(n for n in names if a[key].get(n) != b[key].get(n)))
        else:
            out.append(key)
    return out


# ------------------------------------------------------------ stage runs
@dataclass
class Run:
    """One stage applied twice to equal fresh copies of the state it needs."""

    stage: Stage
    params_before: dict[str, Any]
    state: PTQState
    before: dict[str, Any]
    after: dict[str, Any]
    out: PTQState
    out_again: PTQState
    suffix: list[str]


@pytest.fixture(scope="session")
def prefix_state(graphs, calib):
    """Factory: the state after a list of stages (default options) on one graph, computed once."""
    cache: dict[tuple[str, tuple[str, ...]], PTQState] = {}

    def make(graph: str, stages: tuple[str, ...]) -> PTQState:
        key = (graph, stages)
        if key not in cache:
            if stages:
                cache[key] = create_stage(stages[-1], REQUIRED.get(stages[-1])).apply(clone(make(graph, stages[:-1])))
            else:
                cache[key] = PTQState(graphs[graph].copy(), CONFIG, calib.copy(), seed=SEED)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def stage_run(prefix_state):
    """Factory: the Run of (stage, variant, graph), computed once (a failure fails each test)."""
    cache: dict[tuple[str, str, str], Run | str] = {}

    def make(name: str, variant: str, graph: str) -> Run:
        key = (name, variant, graph)
        if key not in cache:
            kind, full = VARIANTS[variant]
            try:
                cache[key] = _run(name, OPTION_SETS[name][kind], full, prefix_state, graph)
            except Exception as exc:  # failed once, reported by every test of the case
                cache[key] = f"{type(exc).__name__}: {exc}\n" + "".join(
                    traceback.format_tb(exc.__traceback__)[-4:]
                )
        if isinstance(cache[key], str):
            pytest.fail(f"running {name} ({variant} prefix, {graph} graph) failed: {cache[key]}")
        return cache[key]

    return make


def _run(name: str, options: dict[str, Any], full: bool, prefix_state: Any, graph: str) -> Run:
    prefix, suffix = plan(name, full)
    base = prefix_state(graph, tuple(prefix))
    stage = create_stage(name, options)
    params_before = copy.deepcopy(stage.get_params())
    state, state_again = clone(base), clone(base)
    before = snapshot(state)
    assert snapshot(state_again) == before  # the two inputs really are equal
    out = stage.apply(state)
    after = snapshot(state)
    out_again = stage.apply(state_again)
    return Run(stage, params_before, state, before, after, out, out_again, suffix)


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", STAGE_NAMES)
def test_name_and_order_declarations(name):
    """5: the class's name is its registry key; its planned pipelines are valid."""
    cls = registry()[name]
    assert issubclass(cls, Stage), f"{name} is not a Stage"
    assert cls.name == name, f"registered as '{name}' but {cls.__name__}.name is '{cls.name}'"
    stage = create_stage(name)
    assert type(stage) is cls and stage.name == name
    known = set(registry())
    assert set(cls.requires) <= known and set(cls.precedes) <= known, (cls.requires, cls.precedes)
    for full in (False, True):
        pipeline = [*plan(name, full)[0], name, *plan(name, full)[1]]
        assert order_problem(pipeline) is None, (pipeline, order_problem(pipeline))


@pytest.mark.parametrize(("name", "kind"), OPTION_CASES)
def test_get_params_round_trips_through_create_stage(name, kind):
    """2: create_stage(name, stage.get_params()) rebuilds a stage with the same params."""
    options = OPTION_SETS[name][kind]
    stage = create_stage(name, options)
    params = stage.get_params()
    assert list(params) == registry()[name].param_names()
    for option, value in options.items():  # the non-default values were kept as given
        assert params[option] == value, (option, params[option], value)
    again = create_stage(name, params)
    assert again.get_params() == params
    assert create_stage(name, again.get_params()).get_params() == params


@pytest.mark.parametrize(("name", "variant", "graph"), RUN_CASES)
def test_apply_returns_a_new_state_and_keeps_the_stage(stage_run, name, variant, graph):
    """5: apply returns a PTQState that is not its input, and leaves the stage's params alone."""
    run = stage_run(name, variant, graph)
    assert isinstance(run.out, PTQState), f"{name}.apply returned {type(run.out).__name__}"
    assert run.out is not run.state, f"{name}.apply returned its input state object"
    assert run.stage.get_params() == run.params_before, f"{name}.apply changed the stage's params"


@pytest.mark.parametrize(("name", "variant", "graph"), RUN_CASES)
def test_apply_never_mutates_its_input(stage_run, name, variant, graph):
    """1: a deep snapshot of the input state is identical after apply."""
    run = stage_run(name, variant, graph)
    assert run.after == run.before, f"{name} changed its input state: {diff(run.before, run.after)}"


@pytest.mark.parametrize(("name", "variant", "graph"), RUN_CASES)
def test_same_seed_same_result(stage_run, name, variant, graph):
    """3: the stage applied to two equal fresh states gives bitwise equal results."""
    run = stage_run(name, variant, graph)
    first, second = snapshot(run.out, log_details=False), snapshot(run.out_again, log_details=False)
    assert first == second, f"{name} gave different results on equal states: {diff(first, second)}"


@pytest.mark.parametrize(("name", "variant", "graph"), RUN_CASES)
def test_output_state_exports(stage_run, name, variant, graph, tmp_path):
    """4: the state after the stage (+ range_setting when it comes later) exports and runs."""
    run = stage_run(name, variant, graph)
    state = run.out
    for later in run.suffix:
        state = create_stage(later).apply(state)
    written = export_state(state, tmp_path, "onnx,encodings")
    assert sorted(written) == ["encodings", "onnx"]
    for path in written.values():
        assert path.is_file() and path.stat().st_size > 0, path
    encodings = json.loads(written["encodings"].read_text())
    assert encodings, "empty encodings.json"
    model = onnx.load(str(written["onnx"]))
    bad = [
        t.name
        for t in model.graph.initializer
        if (a := numpy_helper.to_array(t)).dtype.kind == "f" and not np.all(np.isfinite(a))
    ]
    assert not bad, f"non-finite initializers in the QDQ model after {name}: {bad}"
    options = ort.SessionOptions()
    # the QDQ graph as written, not fused into onnxruntime's integer kernels
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        str(written["onnx"]), options, providers=["CPUExecutionProvider"]
    )
    x = state.calib[:4]
    outputs = session.run(None, {session.get_inputs()[0].name: x})
    assert outputs and outputs[0].shape == (4, 10), [o.shape for o in outputs]
    for out in outputs:
        assert np.all(np.isfinite(out)), f"non-finite outputs of the QDQ model after {name}"

"""The pipeline contract: stages, their registry, the state they pass on (YAML files: pipeline_file).

A Stage takes its hyperparameters in the constructor (``get_params`` gives them
back, as scikit-learn estimators do) and does its work in ``apply(state) ->
state``. Stages register under a name so a YAML pipeline can say
``- range_setting: {weights: minmax}``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from tinyptq.config import QuantConfig
from tinyptq.errors import ConfigError
from tinyptq.graph.base import ModelGraph
from tinyptq.params import Constraint, validate
from tinyptq.quant import Encoding

if TYPE_CHECKING:
    from tinyptq.pipeline_file import PipelineSpec

_REGISTRY: dict[str, type[Stage]] = {}


# --------------------------------------------------------------------- state
@dataclass
class StageRecord:
    """What one stage did: its options, wall time and summary lines."""

    stage: str
    params: dict[str, Any]
    seconds: float = 0.0
    lines: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class PTQState:
    """Everything a stage reads and writes.

    ``fixed_weights`` holds integer kernels chosen by a rounding stage (on the
    grid of ``weight_encodings``); layers without one use nearest rounding.
    ``bn_stats`` keeps, per layer, the batch-norm parameters folded into it
    (gamma, beta, mean, var, epsilon): the output distribution that data-free
    stages (analytical bias correction) rely on after folding.
    """

    graph: ModelGraph
    config: QuantConfig
    calib: np.ndarray
    weight_encodings: dict[str, Encoding] = field(default_factory=dict)
    act_encodings: dict[str, Encoding] = field(default_factory=dict)
    fixed_weights: dict[str, np.ndarray] = field(default_factory=dict)
    bn_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    log: list[StageRecord] = field(default_factory=list)
    seed: int = 0
    # optional memo for expensive, reusable intermediate results (see StageCache)
    cache: StageCache | None = field(default=None, compare=False, repr=False)

    def evolve(self, copy_graph: bool = False, **changes: Any) -> PTQState:
        """A new state sharing nothing mutable with this one (the graph copied on request)."""
        fresh = {
            "weight_encodings": dict(self.weight_encodings),
            "act_encodings": dict(self.act_encodings),
            "fixed_weights": dict(self.fixed_weights),
            "bn_stats": dict(self.bn_stats),
            "log": list(self.log),
        }
        new = dataclasses.replace(self, **{**fresh, **changes})
        if copy_graph and "graph" not in changes:
            new.graph = self.graph.copy()
        return new

    def quantized_kernels(self) -> dict[str, np.ndarray]:
        """The kernels as the deployed model holds them (float values on their grids)."""
        return {
            name: self.weight_encodings[name].dequantize(q) for name, q in self.integer_kernels().items()
        }

    def integer_kernels(self) -> dict[str, np.ndarray]:
        """The kernels' integers on their grids (int32, graph layout): what exporters store."""
        kernels = {}
        for layer in self.graph.quant_layers():
            enc = self.weight_encodings.get(layer.name)
            if enc is None:
                continue
            fixed = self.fixed_weights.get(layer.name)
            if fixed is not None:
                kernels[layer.name] = np.rint(fixed).astype(np.int32)
            else:
                kernels[layer.name] = enc.quantize(self.graph.kernel(layer.name))
        return kernels

    def stage_seconds(self) -> dict[str, float]:
        """Wall time per stage (stages of the same name numbered)."""
        out: dict[str, float] = {}
        for rec in self.log:
            key, n = rec.stage, 2
            while key in out:
                key, n = f"{rec.stage}#{n}", n + 1
            out[key] = round(rec.seconds, 4)
        return out


def require_no_encodings(state: PTQState, stage: str) -> None:
    """Raise ConfigError when ranges were set already (a weight-rewriting stage would void them)."""
    if state.weight_encodings or state.act_encodings or state.fixed_weights:
        raise ConfigError(
            f"{stage} changes weights and activation ranges, so it must run before range_setting; "
            f"move '{stage}' ahead of range_setting in the pipeline"
        )


class StageCache:
    """Where stages may keep results that other runs on the same model and data reuse.

    The base class computes every time; the ablation runner passes a disk cache
    whose keys also cover the model and the calibration data.
    """

    def get_or_compute(self, kind: str, key: Any, compute: Callable[[], Any]) -> Any:
        """The value stored under (kind, key), computed and stored when missing."""
        return compute()


class MemoryCache(StageCache):
    """A StageCache in this process's memory: runs that share it compute each entry once."""

    def __init__(self) -> None:
        self.store: dict[str, Any] = {}

    def get_or_compute(self, kind: str, key: Any, compute: Callable[[], Any]) -> Any:
        """The stored value, computed on first use."""
        full = repr((kind, key))
        if full not in self.store:
            self.store[full] = compute()
        return self.store[full]


# --------------------------------------------------------------------- stage
class Stage:
    """Base class of pipeline stages: hyperparameters in ``__init__``, work in ``apply``.

    ``requires``: stages that must come earlier in the pipeline.
    ``precedes``: stages that must not come earlier (this one rewrites what they set).
    ``batch_norms_only``: True for a stage with nothing to do on a model without
    batch norms (bn_folding); there a ``requires`` naming it is met without it.
    ``uses_quant_config``: False for stages whose result does not depend on
    bit-widths or granularity (their output is shared across bit settings).
    ``rounds_weights``: True for stages that choose the kernels' rounding
    (``state.fixed_weights``: adaround, brecq, gptq); a pipeline has at most one.
    ``parameter_constraints``: one :mod:`tinyptq.params` constraint per
    constructor option. Every constructor is wrapped (``__init_subclass__``) so
    that its options are validated, and normalized, before its body runs:
    the stage itself only stores them. ``check_params`` adds checks that
    involve several options.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    precedes: ClassVar[tuple[str, ...]] = ()
    batch_norms_only: ClassVar[bool] = False
    uses_quant_config: ClassVar[bool] = True
    rounds_weights: ClassVar[bool] = False
    parameter_constraints: ClassVar[dict[str, Constraint]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _validating_init(cls.__dict__["__init__"])

    @classmethod
    def undeclared_params(cls) -> list[str]:
        """Constructor options without a declared constraint (a registered stage has none)."""
        return [p for p in cls.param_names() if p not in cls.parameter_constraints]

    @classmethod
    def validate_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """The options checked against ``parameter_constraints`` (ConfigError in the one format)."""
        out = {}
        for option, value in params.items():
            constraint = cls.parameter_constraints.get(option)
            if constraint is None:
                raise TypeError(f"{cls.__name__} declares no constraint for option '{option}'")
            out[option] = validate(cls.name or cls.__name__, option, value, constraint)
        return cls.check_params(out)

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Checks between options, after each was validated on its own (none by default)."""
        return params

    @classmethod
    def param_names(cls) -> list[str]:
        """The constructor's option names."""
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

    @classmethod
    def streams_batches(cls) -> bool:
        """Whether ``batch_size`` (if an option) is how many calibration samples are streamed at a time."""
        return "batch_size" in cls.param_names()

    def get_params(self) -> dict[str, Any]:
        """The options this stage was built with."""
        return {p: getattr(self, p) for p in self.param_names()}

    def apply(self, state: PTQState) -> PTQState:
        """Return a new state with this stage's work done."""
        raise NotImplementedError

    def record(self, state: PTQState, lines: Iterable[str] = (), **details: Any) -> StageRecord:
        """Append this stage's record to the state's log (the runner fills in the time)."""
        rec = StageRecord(self.name, self.get_params(), lines=list(lines), details=details)
        state.log.append(rec)
        return rec

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({opts})"


def _validating_init(init: Callable[..., None]) -> Callable[..., None]:
    """``init`` with its options validated against the stage's declared constraints first."""
    signature = inspect.signature(init)

    @functools.wraps(init)  # keeps the signature: param_names() reads it
    def __init__(self: Stage, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        options = dict(list(bound.arguments.items())[1:])
        init(self, **type(self).validate_params(options))

    return __init__


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage available to YAML pipelines under ``cls.name``.

    Every constructor option must have a declared constraint (and every
    constraint an option), so that no option reaches a stage unchecked.
    """
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    missing = cls.undeclared_params()
    extra = sorted(set(cls.parameter_constraints) - set(cls.param_names()))
    if missing or extra:
        raise TypeError(
            f"{cls.__name__}.parameter_constraints must cover exactly its options "
            f"(undeclared: {missing}, not options: {extra})"
        )
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Stage]]:
    """All registered stages by name (importing the components registers them)."""
    import tinyptq.components  # noqa: F401  (registration side effect)

    return dict(_REGISTRY)


def create_stage(name: str, options: dict[str, Any] | None = None) -> Stage:
    """Instantiate a registered stage, naming unknown stages / options in the error."""
    stages = registry()
    if name not in stages:
        raise ConfigError(f"unknown stage '{name}'; valid stages: {', '.join(sorted(stages))}")
    cls = stages[name]
    options = dict(options or {})
    for key in options:
        option_constraint(name, key)
    return cls(**options)


def option_constraint(stage: str, option: str) -> Constraint:
    """The declared constraint of a stage option; ConfigError naming an unknown stage or option."""
    stages = registry()
    if stage not in stages:
        raise ConfigError(f"unknown stage '{stage}'; valid stages: {', '.join(sorted(stages))}")
    cls = stages[stage]
    if option not in cls.param_names():
        valid = ", ".join(cls.param_names())
        raise ConfigError(f"unknown option '{option}' for stage '{stage}'; valid options: {valid}")
    return cls.parameter_constraints[option]


def order_problem(stage_names: list[str], batch_norms: bool | None = None) -> str | None:
    """Why these stages cannot run in this order, or None when they can.

    ``batch_norms``: whether the model has batch norms; False waives requirements
    on ``batch_norms_only`` stages. None (model not known, as when a grid
    expands) keeps every requirement.
    """
    stages = registry()
    for i, name in enumerate(stage_names):
        cls = stages.get(name)
        if cls is None:
            return f"unknown stage '{name}'"
        earlier = stage_names[:i]
        rounding = [e for e in earlier if stages[e].rounds_weights] if cls.rounds_weights else []
        if rounding:  # the later one would start from, and overwrite, the earlier one's rounding
            return f"{rounding[0]} and {name} both round the weights: use one rounding stage"
        for req in cls.requires:
            waived = batch_norms is False and req in stages and stages[req].batch_norms_only
            if req not in earlier and not waived:
                return f"{name} needs {req} before it"
        for later in cls.precedes:
            if later in earlier:
                return f"{name} must run before {later}"
    if "range_setting" not in stage_names:
        return "no range_setting stage: nothing would be quantized"
    return None


class Pipeline:
    """An ordered list of stages, run one after the other on a PTQState."""

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = list(stages)

    @classmethod
    def from_spec(cls, spec: PipelineSpec) -> Pipeline:
        """The pipeline a spec describes."""
        return cls(spec.build())

    def run(
        self,
        state: PTQState,
        on_stage: Callable[[Stage, int, int], None] | None = None,
        on_state: Callable[[Stage, PTQState], None] | None = None,
    ) -> PTQState:
        """Apply every stage in order, timing each into the state's log.

        ``on_stage(stage, index, total)`` is called before each stage (progress);
        ``on_state(stage, state)`` after it, with the state it returned.
        """
        for index, stage in enumerate(self.stages):
            if on_stage is not None:
                on_stage(stage, index, len(self.stages))
            start = time.perf_counter()
            n_before = len(state.log)
            state = stage.apply(state)
            seconds = time.perf_counter() - start
            if len(state.log) == n_before:
                stage.record(state)
            state.log[-1].seconds = seconds
            if on_state is not None:
                on_state(stage, state)
        return state

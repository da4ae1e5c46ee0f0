"""Use cases: a model, its data, its front end, its metric and its calibration set.

Each use case is registered by name (``ic``, ``kws``, ...). Calibration samples
always come from the training side of a split, drawn with a seed; evaluation
uses the held-out side.

Filters (personalization): ``calibration_data(n, seed, where=...)`` and
``eval_set(where=...)`` restrict the samples to those whose metadata match every
``key: value`` of ``where`` (e.g. ``{"speaker": "jackson"}`` on ``kws``, for
calibrating on one user's unlabelled clips). ``UseCase.filter_keys()`` names the
keys a use case accepts (none by default) and ``UseCase.check_filter`` validates a
filter (ConfigError naming the unknown key or value); :func:`parse_filter` reads
the command-line form ``key=value,key=value``. A subclass whose ``calibration_data``
/ ``eval_set`` predate filters (no ``where`` parameter) is adapted when it is
defined: it accepts ``where`` and rejects any non-empty filter with that error.
"""

from __future__ import annotations

import functools
import inspect
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tinyptq import datadir
from tinyptq.datasets.base import check_finite
from tinyptq.errors import ConfigError, DataError
from tinyptq.graph.base import ModelGraph
from tinyptq.graph.loading import load_graph
from tinyptq.metrics import MetricResult, accuracy, sqnr_db, top1_agreement

_USE_CASES: dict[str, type[UseCase]] = {}
# modules of tinyptq.models that register further use cases when imported
_USE_CASE_MODULES = ("kws", "vww", "ad")

#: A sample filter: metadata key -> required value (e.g. {"speaker": "jackson"}).
Filter = Mapping[str, str]
_FILTER_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")
# what the adapters of pre-filter methods copy (not __annotations__: theirs add ``where``)
_WRAPPED = ("__module__", "__name__", "__qualname__", "__doc__")


@dataclass
class EvalSet:
    """Evaluation inputs with labels (None when the metric is label-free)."""

    x: np.ndarray
    y: np.ndarray | None
    source: str
    extra: dict[str, Any] = field(default_factory=dict)


class UseCase(ABC):
    """A tinyML task: model + dataset + front end + metric + calibration set."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    model_asset: ClassVar[str] = ""
    calibration_size: ClassVar[int] = 256

    def __init__(self, data_dir: str | Path | None = None) -> None:
        self.data_dir = datadir.resolve_data_dir(data_dir)

    def model_path(self) -> Path:
        """The use case's default model file (fetched into the data directory if missing)."""
        return datadir.require(self.model_asset, self.data_dir)

    def load_graph(self, model: str | Path | None = None) -> ModelGraph:
        """The model (default or given) as a ModelGraph."""
        return load_graph(model or self.model_path())

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # use cases written before filters existed: accept ``where`` and refuse a non-empty one
        adapters = {"calibration_data": _calibration_with_where, "eval_set": _eval_with_where}
        for name, adapt in adapters.items():
            method = cls.__dict__.get(name)
            abstract = getattr(method, "__isabstractmethod__", False)
            if method is not None and not abstract and not _takes_where(method):
                setattr(cls, name, adapt(method))

    @abstractmethod
    def calibration_data(self, n: int, seed: int, where: Filter | None = None) -> np.ndarray:
        """``n`` seeded samples from the training side, model-ready.

        ``where`` keeps only the samples matching the filter (see :meth:`filter_keys`);
        when fewer than ``n`` match, all of them are used (with one warning).
        """

    @abstractmethod
    def eval_set(self, where: Filter | None = None) -> EvalSet:
        """The evaluation inputs (and labels when available), restricted by ``where``."""

    def filter_keys(self) -> tuple[str, ...]:
        """The metadata keys ``where`` may use with this use case and its data (default: none)."""
        return ()

    def filter_values(self, key: str) -> list[str]:
        """The values ``key`` can take in the data (only called for keys of :meth:`filter_keys`)."""
        return []

    def _no_filter_reason(self) -> str:
        """Why the use case takes no filter, when it is not the default reason."""
        return ""

    def check_filter(self, where: Filter | str | None, what: str = "filter") -> dict[str, str]:
        """``where`` (a mapping or ``key=value,...`` text) as a checked dict; {} for None or empty.

        ConfigError, naming ``what``, for a key the use case does not take (listing
        the valid ones) or a value not found in its data (listing the valid values).
        """
        if where is None:
            return {}
        if isinstance(where, str):
            where = parse_filter(where, what)
        if not isinstance(where, Mapping):
            raise ConfigError(
                f"{what} must map keys to values (e.g. speaker=jackson), got {type(where).__name__}"
            )
        out: dict[str, str] = {}
        keys = self.filter_keys()
        for key, value in where.items():
            if key not in keys:
                if not keys:
                    reason = self._no_filter_reason() or "it has no filter keys"
                    raise ConfigError(
                        f"{what}: use case '{self.name}' cannot filter by '{key}': {reason}"
                    )
                raise ConfigError(
                    f"{what}: unknown key '{key}' for use case '{self.name}' "
                    f"(valid: {', '.join(keys)})"
                )
            if not isinstance(value, str) or not value:
                raise ConfigError(
                    f"{what}: the value of '{key}' must be non-empty text, got {value!r}"
                )
            valid = self.filter_values(key)
            if value not in valid:
                raise ConfigError(
                    f"{what}: unknown {key} '{value}' for use case '{self.name}' "
                    f"(valid: {', '.join(valid)})"
                )
            out[key] = value
        return out

    def metric(self, data: EvalSet, scores: np.ndarray, reference: np.ndarray) -> MetricResult:
        """Accuracy with labels, else top-1 agreement with the FP32 ``reference`` scores."""
        if data.y is not None:
            return MetricResult("accuracy", accuracy(data.y, scores), len(data.x))
        # agreement alone says little when FP32 is confident on out-of-domain data:
        # the output SQNR shows how far the scores moved
        extras = {} if scores is reference else {"output SQNR vs FP32 (dB)": sqnr_db(reference, scores)}
        return MetricResult(
            "top-1 agreement with FP32", top1_agreement(reference, scores), len(data.x), extras=extras
        )


def register_use_case(cls: type[UseCase]) -> type[UseCase]:
    """Class decorator: make a use case available by name."""
    _USE_CASES[cls.name] = cls
    return cls


def _load_all() -> None:
    import importlib

    for mod in _USE_CASE_MODULES:
        try:
            importlib.import_module(f"tinyptq.models.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"tinyptq.models.{mod}":
                raise


def use_case_names() -> list[str]:
    """Registered use-case names."""
    _load_all()
    return sorted(_USE_CASES)


def get_use_case(name: str, data_dir: str | Path | None = None) -> UseCase:
    """The use case called ``name``, bound to a data directory."""
    _load_all()
    try:
        cls = _USE_CASES[name]
    except KeyError:
        raise ConfigError(f"unknown use case '{name}'; valid: {', '.join(use_case_names())}") from None
    return cls(data_dir)


def parse_filter(text: str, what: str = "filter") -> dict[str, str]:
    """``"speaker=jackson"`` -> ``{"speaker": "jackson"}``: comma-separated ``key=value`` pairs.

    Blanks around keys and values are ignored. ConfigError (one line, naming
    ``what`` and the text) for an empty pair, a pair without ``=``, an empty or
    malformed key, an empty value or a repeated key.
    """
    if not isinstance(text, str):
        raise ConfigError(f"{what} must be text like speaker=jackson, got {type(text).__name__}")
    shown = text if len(text) <= 80 else text[:77] + "..."
    out: dict[str, str] = {}
    for pair in text.split(","):
        key, eq, value = (part.strip() for part in pair.partition("="))
        if not pair.strip():
            raise ConfigError(f"{what} '{shown}' has an empty pair; expected key=value[,key=value]")
        if not eq or not _FILTER_KEY.match(key) or not value or "=" in value:
            raise ConfigError(
                f"{what} '{shown}' is malformed at '{pair.strip()}': expected key=value pairs "
                "separated by commas (e.g. speaker=jackson)"
            )
        if key in out:
            raise ConfigError(f"{what} '{shown}' gives '{key}' twice")
        out[key] = value
    return out


def describe_filter(where: Filter) -> str:
    """A filter as ``key=value,...`` text (the form :func:`parse_filter` reads)."""
    return ",".join(f"{k}={v}" for k, v in where.items())


def filter_rows(columns: Mapping[str, np.ndarray], where: Filter, what: str) -> np.ndarray:
    """Sorted indices of the rows whose ``columns[key]`` equal ``where[key]`` for every key.

    ``columns`` holds one metadata array per filter key, a value per row; DataError
    naming ``what`` when no row matches.
    """
    lengths = {len(c) for c in columns.values()}
    if len(lengths) != 1:
        raise ValueError("filter columns must have one value per row")
    mask = np.ones(lengths.pop(), bool)
    for key, value in where.items():
        mask &= np.asarray(columns[key]) == value
    rows = np.flatnonzero(mask)
    if rows.size == 0:
        raise DataError(f"no {what} match {describe_filter(where)}")
    return rows


def seeded_rows_sample(x: np.ndarray, rows: np.ndarray, n: int, seed: int, what: str) -> np.ndarray:
    """``n`` of the ``rows`` of ``x`` drawn with ``seed`` (all, with one warning, when fewer).

    The draw depends only on ``len(rows)``, ``n`` and ``seed``: the same filter and
    seed give the same samples.
    """
    pick = seeded_index(len(rows), n, seed)
    if n > len(rows):
        warnings.warn(
            f"{what}: {n} calibration samples asked but only {len(rows)} match; "
            f"using all {len(rows)}",
            stacklevel=3,
        )
    return check_finite(np.asarray(x[rows[pick]], np.float32), what)


def _takes_where(method: Any) -> bool:
    """Whether ``method`` accepts a ``where`` keyword."""
    params = inspect.signature(method).parameters
    var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return "where" in params or var_keyword


def _refuse_filter(uc: UseCase, where: Filter | str | None, what: str) -> None:
    """Raise when a use case without filter support is given a non-empty filter."""
    if uc.check_filter(where, what):  # without filter keys, check_filter has raised already
        raise ConfigError(f"{what}: use case '{uc.name}' does not implement filters")


def _calibration_with_where(method: Any) -> Any:
    @functools.wraps(method, assigned=_WRAPPED)
    def calibration_data(
        self: UseCase, n: int, seed: int, where: Filter | None = None
    ) -> np.ndarray:
        _refuse_filter(self, where, "calibration filter")
        return method(self, n, seed)

    # its own signature (with ``where``), not the wrapped method's
    calibration_data.__signature__ = inspect.signature(calibration_data, follow_wrapped=False)
    return calibration_data


def _eval_with_where(method: Any) -> Any:
    @functools.wraps(method, assigned=_WRAPPED)
    def eval_set(self: UseCase, where: Filter | None = None) -> EvalSet:
        _refuse_filter(self, where, "evaluation filter")
        return method(self)

    eval_set.__signature__ = inspect.signature(eval_set, follow_wrapped=False)
    return eval_set


def seeded_index(total: int, n: int, seed: int) -> np.ndarray:
    """Sorted indices of ``min(n, total)`` items drawn without replacement with ``seed``."""
    if n <= 0:
        raise ConfigError(f"calibration samples must be positive, got {n}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=min(n, total), replace=False))


def seeded_sample(x: np.ndarray, n: int, seed: int, what: str) -> np.ndarray:
    """``n`` rows of ``x`` drawn without replacement with ``seed``; checked finite."""
    index = seeded_index(len(x), n, seed)
    return check_finite(np.asarray(x[index], np.float32), what)


@register_use_case
class ImageClassification(UseCase):
    """MLPerf Tiny ResNet-8 on CIFAR-10 (raw 0-255 pixels, NHWC)."""

    name = "ic"
    description = "image classification: MLPerf Tiny ResNet-8 on CIFAR-10"
    model_asset = "ic_resnet8"
    calibration_size = 256

    def _cifar(self, train: bool, test: bool):
        from tinyptq.datasets.cifar10 import load_cifar10

        return load_cifar10(datadir.require("cifar10", self.data_dir), train=train, test=test)

    def calibration_data(self, n: int, seed: int, where: Filter | None = None) -> np.ndarray:
        self.check_filter(where, "calibration filter")  # ic has no filter keys
        return seeded_sample(self._cifar(True, False)["train"].x, n, seed, "CIFAR-10 calibration images")

    def eval_set(self, where: Filter | None = None) -> EvalSet:
        self.check_filter(where, "evaluation filter")
        test = self._cifar(False, True)["test"]
        return EvalSet(test.x.astype(np.float32), test.y, "CIFAR-10 test_batch")

"""Grid files: which PTQ configurations an ablation runs, and their expansion.

A grid names use cases, bit settings, a base pipeline and toggles; scikit-learn's
ParameterGrid expands them into runs. Each run gets two hashes: ``config_hash``
covers what is computed (runs whose toggles resolve to the same pipeline share
it and are computed once) and ``run_id`` adds the toggle values (one stored row
per grid point, so that with/without comparisons always find their pair).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sklearn.model_selection import ParameterGrid

from tinyptq.cache import content_hash
from tinyptq.config import QuantConfig
from tinyptq.errors import ConfigError
from tinyptq.params import (
    BATCH_SIZE,
    CALIB_SAMPLES,
    SEED,
    Constraint,
    Optional,
    Options,
    Switch,
    validate,
)
from tinyptq.paths import safe_name
from tinyptq.pipeline import create_stage, option_constraint, order_problem, registry
from tinyptq.pipeline_file import PipelineSpec, read_yaml
from tinyptq.quant import BITS

TOP_KEYS = (
    "name",
    "description",
    "use_cases",
    "bits",
    "granularity",
    "pipeline",
    "toggles",
    "calibration",
    "seeds",
)
GRANULARITIES = ("per_tensor", "per_channel")
CALIB_KEYS = ("samples", "batch_size")
BITS_KEYS = ("weights", "activations", "granularity")
ON, OFF = "on", "off"
# quant fields a toggle may not set: the bits entries set them
NOT_TOGGLED = ("weight_bits", "act_bits", "weight_per_channel")
_BITS_TEXT = re.compile(r"^W(\d+)A(\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class BitSetting:
    """Weight and activation bit-widths with the weight granularity."""

    weight_bits: int
    act_bits: int
    granularity: str

    @property
    def text(self) -> str:
        """'W4A8 per-channel'."""
        return f"W{self.weight_bits}A{self.act_bits} {self.granularity.replace('_', '-')}"


@dataclass
class Run:
    """One grid point: what to compute and the toggle values that led to it."""

    run_id: str
    config_hash: str
    use_case: str
    bits: BitSetting
    calib_samples: int
    seed: int
    toggles: dict[str, str]
    pipeline: dict[str, Any]  # PipelineSpec.to_dict(), quant settings included
    skip_reason: str | None = None

    @property
    def label(self) -> str:
        """The toggle values as short text ('base' when the grid has no toggles)."""
        return " ".join(f"{k}={v}" for k, v in self.toggles.items()) or "base"

    def stage_names(self) -> list[str]:
        """The pipeline's stages in order."""
        return [next(iter(s)) for s in self.pipeline["stages"]]


@dataclass
class Grid:
    """A parsed, validated grid file."""

    name: str
    use_cases: list[str]
    bits: list[BitSetting]
    pipeline: PipelineSpec
    toggles: dict[str, list[Any]] = field(default_factory=dict)  # every key, every value listed
    subgrids: list[dict[str, list[Any]]] = field(default_factory=list)  # [] : one, ``toggles``
    calib_samples: list[int] = field(default_factory=lambda: [256])
    calib_batch_size: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    description: str = ""
    source: str = ""

    # ------------------------------------------------------------- parsing
    @classmethod
    def from_yaml(cls, path: str | Path) -> Grid:
        """Read and validate a grid file."""
        path = Path(path)
        data = read_yaml(path, "grid file")
        return cls.from_dict(data, default_name=path.stem, base_dir=path.parent, source=str(path))

    @classmethod
    def from_dict(
        cls, data: Any, default_name: str = "grid", base_dir: Path | None = None, source: str = ""
    ) -> Grid:
        """Validate plain data (as read from YAML); errors name the key and the valid choices."""
        if not isinstance(data, dict):
            raise ConfigError("a grid must be a mapping with 'use_cases', 'bits' and 'pipeline'")
        _check_keys(data, TOP_KEYS, "grid key")
        for required in ("use_cases", "bits", "pipeline"):
            if required not in data:
                raise ConfigError(f"grid key '{required}' is missing")
        calibration = data.get("calibration")
        calibration = {} if calibration is None else calibration
        if not isinstance(calibration, dict):
            raise ConfigError(
                "grid key 'calibration' must be a mapping with 'samples' (and 'batch_size')"
            )
        _check_keys(calibration, CALIB_KEYS, "calibration key")
        granularity = _values(data.get("granularity", ["per_channel"]), "granularity")
        pipeline = _parse_pipeline(data["pipeline"], base_dir)
        grid = cls(
            # the name becomes a directory (runs/ablate-<name>): never a path
            name=safe_name(str(data.get("name") or default_name), "grid"),
            description=str(data.get("description") or ""),
            use_cases=_parse_use_cases(data["use_cases"]),
            bits=_parse_bits(data["bits"], granularity),
            pipeline=pipeline,
            subgrids=_parse_subgrids(_or_empty(data.get("toggles")), pipeline),
            calib_samples=_values(calibration.get("samples", [256]), "calibration.samples"),
            calib_batch_size=_value(calibration.get("batch_size"), "calibration.batch_size"),
            seeds=_values(data.get("seeds", [0]), "seeds"),
            source=source,
        )
        grid.toggles = _merged(grid.subgrids)
        return grid

    def to_dict(self) -> dict[str, Any]:
        """Plain data describing the grid (stored with the results)."""
        out = {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "use_cases": list(self.use_cases),
            "bits": [b.text for b in self.bits],
            "pipeline": self.pipeline.to_dict(),
            "toggles": {k: [_value_text(v) for v in vals] for k, vals in self.toggles.items()},
            "calibration": {
                "samples": list(self.calib_samples),
                "batch_size": self.calib_batch_size,
            },
            "seeds": list(self.seeds),
        }
        if len(self.subgrids) > 1:
            out["subgrids"] = [
                {k: [_value_text(v) for v in vals] for k, vals in sub.items()}
                for sub in self.spaces()
            ]
        return out

    # ----------------------------------------------------------- expansion
    def spaces(self) -> list[dict[str, list[Any]]]:
        """The toggle sub-grids, each with every toggle key (one it leaves out: the base value)."""
        subgrids = self.subgrids or [self.toggles]
        return [
            {key: sub.get(key, [self._base_value(key)]) for key in self.toggles} for sub in subgrids
        ]

    def _base_value(self, key: str) -> Any:
        """What the base pipeline does for toggle ``key``: on, its option's value, its quant field."""
        head, _, option = key.partition(".")
        if head == "quant":
            return self.pipeline.quant.get(option, getattr(QuantConfig(), option))
        if not option:
            return ON
        opts = dict(self.pipeline.stages[[n for n, _ in self.pipeline.stages].index(head)][1])
        return create_stage(head, opts).get_params()[option]

    def expand(self) -> list[Run]:
        """Every grid point as a Run (ParameterGrid order, sub-grid by sub-grid, each point once).

        Incompatible points get a skip reason.
        """
        keys = list(self.toggles)
        spaces = []
        for sub in self.spaces():
            space: dict[str, list[Any]] = {
                "use_case": list(self.use_cases),
                "bits": list(self.bits),
                "calib_samples": list(self.calib_samples),
                "seed": list(self.seeds),
            }
            space.update({f"toggle:{i}": list(sub[k]) for i, k in enumerate(keys)})
            spaces.append(space)
        runs: dict[str, Run] = {}
        for point in ParameterGrid(spaces):
            run = self._resolve(point, {k: point[f"toggle:{i}"] for i, k in enumerate(keys)})
            runs.setdefault(run.run_id, run)
        return list(runs.values())

    def _resolve(self, point: dict[str, Any], toggles: dict[str, Any]) -> Run:
        bits: BitSetting = point["bits"]
        stages = [(name, dict(opts)) for name, opts in self.pipeline.stages]
        quant = dict(self.pipeline.quant)
        off = {k for k, v in toggles.items() if "." not in k and v == OFF}
        for key, value in toggles.items():
            head, _, option = key.partition(".")
            if head == "quant":
                quant[option] = value
            elif option and head not in off:
                for name, opts in stages:
                    if name == head:
                        opts[option] = value
        stages = [(n, o) for n, o in stages if n not in off]
        quant.update(
            weight_bits=bits.weight_bits,
            act_bits=bits.act_bits,
            weight_per_channel=bits.granularity == "per_channel",
        )
        calibration = {"samples": point["calib_samples"], "seed": point["seed"]}
        if self.calib_batch_size is not None:
            calibration["batch_size"] = self.calib_batch_size
        spec = PipelineSpec(
            name=self.pipeline.name, stages=stages, quant=quant, calibration=calibration
        )
        pipeline = spec.to_dict()
        problem = order_problem([n for n, _ in stages])
        if problem is None:
            try:
                spec.build()
                spec.quant_config()
            except ConfigError as exc:
                problem = str(exc)
        config_hash = content_hash("run", point["use_case"], pipeline)
        texts = {k: _value_text(v) for k, v in toggles.items()}
        return Run(
            run_id=content_hash(config_hash, texts),
            config_hash=config_hash,
            use_case=point["use_case"],
            bits=bits,
            calib_samples=point["calib_samples"],
            seed=point["seed"],
            toggles=texts,
            pipeline=pipeline,
            skip_reason=problem,
        )


# -------------------------------------------------------------- validation
def _check_keys(data: dict, valid: tuple[str, ...], what: str) -> None:
    for key in data:
        if key not in valid:
            raise ConfigError(f"unknown {what} '{key}'; valid: {', '.join(valid)}")


def _check_choice(value: Any, valid: tuple[str, ...] | list[str], what: str) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {what} '{value}'; valid: {', '.join(valid)}")


def _as_list(value: Any, key: str) -> list[Any]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ConfigError(f"grid key '{key}' is an empty list")
    return values


def value_constraints() -> dict[str, Constraint]:
    """The declared constraint of every value a grid lists, by key (``bits.*``: mapping entries)."""
    from tinyptq.models.usecases import use_case_names

    return {
        "use_cases": Options(*use_case_names()),
        "granularity": Options(*GRANULARITIES),
        "bits.weights": BITS,
        "bits.activations": BITS,
        "bits.granularity": Options(*GRANULARITIES),
        "calibration.samples": CALIB_SAMPLES,
        "calibration.batch_size": Optional(BATCH_SIZE),  # null: the stages' own batch sizes
        "seeds": SEED,
    }


def toggle_constraint(key: str) -> Constraint:
    """The constraint on the values of toggle ``key``: that of the option it sets, or on / off."""
    head, _, option = key.partition(".")
    if head == "quant":
        return QuantConfig.field_constraints[option]
    return option_constraint(head, option) if option else Switch()


def _value(value: Any, key: str) -> Any:
    """One value of grid key ``key``, validated against its declared constraint."""
    return validate("grid", key, value, value_constraints()[key])


def _values(value: Any, key: str) -> list[Any]:
    """The values listed under grid key ``key`` (one value or a list), each validated."""
    return [_value(v, key) for v in _as_list(value, key)]


def _parse_use_cases(value: Any) -> list[str]:
    return _values(value, "use_cases")


def _parse_bits(value: Any, granularity: list[str]) -> list[BitSetting]:
    out: list[BitSetting] = []
    for entry in _as_list(value, "bits"):
        grans = granularity
        if isinstance(entry, str):
            m = _BITS_TEXT.match(entry.strip())
            if not m:
                raise ConfigError(
                    f"bits entry '{entry}' must look like 'W4A8' or {{weights: 4, activations: 8}}"
                )
            w, a = int(m.group(1)), int(m.group(2))
        elif isinstance(entry, dict):
            _check_keys(entry, BITS_KEYS, "bits key")
            if "weights" not in entry or "activations" not in entry:
                raise ConfigError(f"bits entry {entry} needs both 'weights' and 'activations'")
            w, a = entry["weights"], entry["activations"]
            if "granularity" in entry:
                grans = [_value(entry["granularity"], "bits.granularity")]
        else:
            raise ConfigError(
                f"bits entry {entry!r} must look like 'W4A8' or {{weights: 4, activations: 8}}"
            )
        w, a = _value(w, "bits.weights"), _value(a, "bits.activations")
        for g in grans:
            setting = BitSetting(w, a, g)
            if setting not in out:
                out.append(setting)
    return out


def _parse_pipeline(value: Any, base_dir: Path | None) -> PipelineSpec:
    from tinyptq.api import load_pipeline

    if isinstance(value, str) and base_dir is not None and (base_dir / value).is_file():
        value = base_dir / value
    if isinstance(value, dict):
        value = dict(value)
        value.setdefault("name", "base")
    return load_pipeline(value)


def _or_empty(toggles: Any) -> Any:
    """No toggles (key absent or null): one sub-grid without toggles."""
    return {} if toggles is None else toggles


def _parse_subgrids(toggles: Any, pipeline: PipelineSpec) -> list[dict[str, list[Any]]]:
    """``toggles``: one mapping, or a list of them (sub-grids expanded one after the other)."""
    if isinstance(toggles, list):
        if not toggles:
            raise ConfigError("grid key 'toggles' is an empty list")
        return [_parse_toggles(sub, pipeline) for sub in toggles]
    return [_parse_toggles(toggles, pipeline)]


def _merged(subgrids: list[dict[str, list[Any]]]) -> dict[str, list[Any]]:
    """Every toggle key of the sub-grids with every value they list (first-seen order)."""
    out: dict[str, list[Any]] = {}
    for sub in subgrids:
        for key, values in sub.items():
            seen = out.setdefault(key, [])
            seen.extend(v for v in values if _value_text(v) not in map(_value_text, seen))
    return out


def _parse_toggles(toggles: Any, pipeline: PipelineSpec) -> dict[str, list[Any]]:
    if not isinstance(toggles, dict):
        raise ConfigError(
            "grid key 'toggles' must be a mapping like {cle: [off, on]} or a list of such mappings"
        )
    in_pipeline = [name for name, _ in pipeline.stages]
    quant_fields = [f for f in QuantConfig.field_constraints if f not in NOT_TOGGLED]
    out: dict[str, list[Any]] = {}
    for key, values in toggles.items():
        key = str(key)
        values = _as_list(values, f"toggles.{key}")
        head, _, option = key.partition(".")
        if head == "quant":
            _check_choice(option, quant_fields, "quant toggle")
            for v in values:  # each value as the option it sets declares (a bool, never "false")
                validate("grid toggle", key, v, toggle_constraint(key))
        else:
            if head not in registry():
                raise ConfigError(
                    f"unknown stage '{head}' in toggle '{key}'; valid stages: {', '.join(sorted(registry()))}"
                )
            if head not in in_pipeline:
                raise ConfigError(
                    f"toggle '{key}': stage '{head}' is not in the base pipeline; "
                    f"add it there (with its options) or toggle one of: {', '.join(in_pipeline)}"
                )
            constraint = toggle_constraint(key)  # names an unknown option
            if option:
                base_opts = dict(pipeline.stages[in_pipeline.index(head)][1])
                for v in values:
                    validate("grid toggle", key, v, constraint)
                    create_stage(head, {**base_opts, option: v})  # checks between options
            else:
                values = [validate("grid toggle", key, v, constraint) for v in values]
        if len(set(map(_value_text, values))) != len(values):
            raise ConfigError(f"toggle '{key}' lists a value twice: {values}")
        out[key] = values
    return out


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)

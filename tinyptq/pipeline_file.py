"""Pipeline files: YAML read safely, validated into a PipelineSpec of stages and settings.

A pipeline file names its stages with options, the quantization settings and
the calibration set; every name and value is checked when the file is read
(unknown stages and options, type and range of every value), not halfway
through a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tinyptq.config import QuantConfig
from tinyptq.errors import ConfigError, first_line
from tinyptq.params import BATCH_SIZE, CALIB_SAMPLES, SEED, Constraint, validate
from tinyptq.pipeline import Stage, create_stage, registry


def read_yaml(path: Path, what: str) -> Any:
    """The YAML document in ``path``; ConfigError naming ``what`` when missing or malformed."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {first_line(exc)}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {exc.start}: {exc.object[exc.start]:#04x})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or first_line(exc)}") from None


# ------------------------------------------------------------------ pipeline
_TOP_KEYS = {"name", "description", "quant", "calibration", "stages"}
# a pipeline's ``calibration:`` block; absent keys take the use case's defaults
CALIBRATION_CONSTRAINTS: dict[str, Constraint] = {
    "samples": CALIB_SAMPLES,
    "seed": SEED,
    "batch_size": BATCH_SIZE,
}
_CALIB_KEYS = set(CALIBRATION_CONSTRAINTS)


@dataclass
class PipelineSpec:
    """A pipeline as written in YAML: stages with options, quantization defaults."""

    name: str = "pipeline"
    stages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    quant: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @classmethod
    def from_yaml(cls, path: str | Path) -> PipelineSpec:
        """Read and validate a pipeline file."""
        path = Path(path)
        return cls.from_dict(read_yaml(path, "pipeline file"), default_name=path.stem)

    @classmethod
    def from_dict(cls, data: Any, default_name: str = "pipeline") -> PipelineSpec:
        """Validate plain data (as read from YAML)."""
        if not isinstance(data, dict):
            raise ConfigError("a pipeline must be a mapping with a 'stages' list")
        unknown = sorted(set(data) - _TOP_KEYS)
        if unknown:
            raise ConfigError(f"unknown pipeline key '{unknown[0]}'; valid keys: {', '.join(sorted(_TOP_KEYS))}")
        calibration = _mapping(data.get("calibration"), "calibration")
        bad = sorted(set(calibration) - _CALIB_KEYS, key=str)
        if bad:
            raise ConfigError(f"unknown calibration option '{bad[0]}'; valid: {', '.join(sorted(_CALIB_KEYS))}")
        calibration = {
            key: validate("calibration", key, value, CALIBRATION_CONSTRAINTS[key])
            for key, value in calibration.items()
        }
        entries = data.get("stages")
        if entries is None:
            entries = []
        if not isinstance(entries, list):
            raise ConfigError(f"pipeline key 'stages' must be a list of stages, got {entries!r}")
        spec = cls(
            name=str(data.get("name") or default_name),
            stages=[_parse_stage_entry(e, i) for i, e in enumerate(entries)],
            quant=_mapping(data.get("quant"), "quant"),
            calibration=calibration,
            description=str(data.get("description") or ""),
        )
        spec.build()  # validates stage names and options now, not halfway through a run
        spec.quant_config()
        return spec

    def build(self) -> list[Stage]:
        """The stage objects, in order.

        ``calibration.batch_size``, when set, is the batch size of every stage
        that streams the calibration data in batches and does not set its own
        (not of the reconstruction stages, whose ``batch_size`` is the
        optimization's minibatch).
        """
        default = self.calibration.get("batch_size")
        stages = registry()
        built = []
        for name, opts in self.stages:
            cls = stages.get(name)
            if default is not None and cls is not None and cls.streams_batches():
                opts = {"batch_size": default, **opts}
            built.append(create_stage(name, opts))
        return built

    def quant_config(self, weight_bits: int | None = None, act_bits: int | None = None) -> QuantConfig:
        """The QuantConfig of this pipeline, with bit-widths overridden when given."""
        cfg = QuantConfig.from_dict(self.quant)
        changes = {k: v for k, v in (("weight_bits", weight_bits), ("act_bits", act_bits)) if v is not None}
        return cfg.replace(**changes) if changes else cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML / JSON) of the whole pipeline."""
        return {
            "name": self.name,
            "quant": dict(self.quant),
            "calibration": dict(self.calibration),
            "stages": [{name: dict(opts)} for name, opts in self.stages],
        }


def _mapping(value: Any, key: str) -> dict[str, Any]:
    """A pipeline key that must hold a mapping (absent or null: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"pipeline key '{key}' must be a mapping, got {value!r}")
    return dict(value)


def _parse_stage_entry(entry: Any, index: int) -> tuple[str, dict[str, Any]]:
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, dict) and len(entry) == 1:
        (name, opts), = entry.items()
        if opts is None:
            opts = {}
        if not isinstance(opts, dict):
            raise ConfigError(f"options of stage '{name}' must be a mapping, got {opts!r}")
        return str(name), dict(opts)
    raise ConfigError(f"stage #{index + 1} must be a name or a one-key mapping 'name: {{options}}'")

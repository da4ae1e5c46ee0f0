"""QuantConfig: which tensors are quantized, at how many bits, with what granularity.

Defaults for weights and activations, plus per-layer overrides matched by
layer-name patterns (shell-style, ``fnmatch``). Mixed precision writes
overrides; every other module only reads the config.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from tinyptq.errors import ConfigError
from tinyptq.params import Boolean, Constraint, Optional, Options, Text, fail, validate
from tinyptq.quant import BITS, QuantSpec

# simulation targets: qdq (float QDQ semantics), tflite (TFLite / TFLite Micro integer kernels),
# onnxruntime (its CPU kernels after its default graph optimizations of the QDQ export)
TARGETS = ("qdq", "tflite", "onnxruntime")


def _check_fields(obj: Any, owner: str) -> None:
    """Validate (and normalize in place) every declared field of a frozen dataclass."""
    for name, constraint in obj.field_constraints.items():
        object.__setattr__(obj, name, validate(owner, name, getattr(obj, name), constraint))


@dataclass(frozen=True)
class LayerOverride:
    """Settings for layers whose name matches ``pattern`` (later overrides win)."""

    pattern: str
    weight_bits: int | None = None
    act_bits: int | None = None
    weight_per_channel: bool | None = None
    weight_symmetric: bool | None = None
    act_symmetric: bool | None = None
    quantize: bool = True

    field_constraints: ClassVar[dict[str, Constraint]] = {
        "pattern": Text(),
        "weight_bits": Optional(BITS),
        "act_bits": Optional(BITS),
        "weight_per_channel": Optional(Boolean()),
        "weight_symmetric": Optional(Boolean()),
        "act_symmetric": Optional(Boolean()),
        "quantize": Boolean(),
    }

    def __post_init__(self) -> None:
        validate("quant override", "pattern", self.pattern, Text())
        _check_fields(self, f"quant override '{self.pattern}'")

    def matches(self, *names: str | None) -> bool:
        """Whether any of the given names matches the pattern."""
        return any(n is not None and fnmatch.fnmatchcase(n, self.pattern) for n in names)


@dataclass(frozen=True)
class QuantConfig:
    """Bit-widths and granularity for the whole model, with per-layer overrides."""

    weight_bits: int = 8
    act_bits: int = 8
    weight_per_channel: bool = False
    weight_symmetric: bool = True
    act_symmetric: bool = False
    weight_narrow_range: bool = False
    keep_first_last_8bit: bool = False
    target: str = "qdq"  # the arithmetic the evaluation reproduces (TARGETS)
    overrides: tuple[LayerOverride, ...] = field(default=())

    # every field but ``overrides`` (a sequence of LayerOverride, checked on its own)
    field_constraints: ClassVar[dict[str, Constraint]] = {
        "weight_bits": BITS,
        "act_bits": BITS,
        "weight_per_channel": Boolean(),
        "weight_symmetric": Boolean(),
        "act_symmetric": Boolean(),
        "weight_narrow_range": Boolean(),
        "keep_first_last_8bit": Boolean(),
        "target": Options(*TARGETS),
    }

    def __post_init__(self) -> None:
        _check_fields(self, "quant")
        overrides = self.overrides
        if not isinstance(overrides, (list, tuple)) or not all(isinstance(o, LayerOverride) for o in overrides):
            fail("quant", "overrides", "a sequence of LayerOverride", overrides)
        object.__setattr__(self, "overrides", tuple(overrides))
        if self.target == "tflite":  # TFLite holds int8 activations and at most 8-bit weights
            for who, act, weight in [("quant", self.act_bits, self.weight_bits)] + [
                (f"quant override '{o.pattern}'", o.act_bits, o.weight_bits) for o in self.overrides
            ]:
                if act not in (None, 8) or (weight is not None and weight > 8):
                    raise ConfigError(
                        f"{who}: the tflite target needs 8-bit activations and at most 8-bit weights, "
                        f"not act_bits {act}, weight_bits {weight}"
                    )

    # ------------------------------------------------------------ resolution
    def _override(self, *names: str | None) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for ov in self.overrides:
            if ov.matches(*names):
                merged.update({k: v for k, v in asdict(ov).items() if v is not None})
        return merged

    def weight_spec(self, layer: str, first_or_last: bool = False) -> QuantSpec | None:
        """The spec for a layer's weights, or None when the layer stays in float."""
        ov = self._override(layer)
        if not ov.get("quantize", True):
            return None
        bits = ov.get("weight_bits", self.weight_bits)
        if first_or_last and self.keep_first_last_8bit and "weight_bits" not in ov:
            bits = max(bits, 8)
        return QuantSpec(
            bits=bits,
            symmetric=ov.get("weight_symmetric", self.weight_symmetric),
            signed=True,
            per_channel=ov.get("weight_per_channel", self.weight_per_channel),
            narrow_range=self.weight_narrow_range,
        )

    def act_spec(
        self, tensor: str, owner: str | None = None, first_or_last: bool = False
    ) -> QuantSpec | None:
        """The spec for an activation tensor (matched by its name or its owner layer)."""
        ov = self._override(tensor, owner)
        if not ov.get("quantize", True):
            return None
        bits = ov.get("act_bits", self.act_bits)
        if first_or_last and self.keep_first_last_8bit and "act_bits" not in ov:
            bits = max(bits, 8)
        return QuantSpec(bits=bits, symmetric=ov.get("act_symmetric", self.act_symmetric))

    # ---------------------------------------------------------- (de)serialize
    def replace(self, **changes: Any) -> QuantConfig:
        """A copy with some fields changed (validated again)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(changes)
        return QuantConfig(**data)

    def with_override(self, override: LayerOverride) -> QuantConfig:
        """A copy with one more override (it takes precedence)."""
        return self.replace(overrides=(*self.overrides, override))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for YAML / JSON."""
        d = asdict(self)
        if d["target"] == "qdq":  # the default stays out: run ids of earlier results remain valid
            del d["target"]
        d["overrides"] = [{k: v for k, v in o.items() if v is not None} for o in d["overrides"]]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> QuantConfig:
        """Build from YAML data, naming unknown keys in the error."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"'quant' must be a mapping of quantization options, got {data!r}")
        data = dict(data)
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - valid, key=str)
        if unknown:
            raise ConfigError(
                f"unknown quantization option '{unknown[0]}'; valid: {', '.join(sorted(valid))}"
            )
        raw = data.pop("overrides", None)
        if raw is None:
            raw = []
        if not isinstance(raw, list):
            fail("quant", "overrides", "a list of mappings with a 'pattern' key", raw)
        override_keys = sorted(f.name for f in fields(LayerOverride))
        overrides = []
        for i, ov in enumerate(raw):
            if not isinstance(ov, dict) or "pattern" not in ov:
                raise ConfigError(f"override #{i + 1} needs a 'pattern' key")
            bad = sorted(set(ov) - set(override_keys), key=str)
            if bad:
                raise ConfigError(f"unknown override option '{bad[0]}'; valid: {', '.join(override_keys)}")
            overrides.append(LayerOverride(**ov))
        return cls(**data, overrides=tuple(overrides))

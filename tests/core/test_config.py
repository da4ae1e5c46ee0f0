"""QuantConfig: defaults, overrides by pattern, first/last at 8 bits, validation."""

from __future__ import annotations

import pytest

from tinyptq.config import LayerOverride, QuantConfig
from tinyptq.errors import ConfigError


def test_defaults_and_overrides_by_pattern():
    cfg = QuantConfig(weight_bits=4, act_bits=8).with_override(
        LayerOverride("conv2d_*", weight_bits=6, weight_per_channel=True)
    )
    assert cfg.weight_spec("dense").bits == 4
    spec = cfg.weight_spec("conv2d_3")
    assert spec.bits == 6 and spec.per_channel and spec.signed
    assert cfg.act_spec("activation_1").bits == 8


def test_later_override_wins_and_owner_matching():
    cfg = QuantConfig.from_dict(
        {
            "act_bits": 8,
            "overrides": [
                {"pattern": "conv*", "act_bits": 4},
                {"pattern": "conv2d_1", "act_bits": 6},
            ],
        }
    )
    # an activation point after a fused conv is matched through its owner layer
    assert cfg.act_spec("activation", owner="conv2d").bits == 4
    assert cfg.act_spec("activation_1", owner="conv2d_1").bits == 6
    assert cfg.act_spec("add", owner=None).bits == 8


def test_keep_first_last_8bit_and_skip():
    cfg = QuantConfig(weight_bits=3, act_bits=4, keep_first_last_8bit=True)
    assert cfg.weight_spec("conv2d", first_or_last=True).bits == 8
    assert cfg.weight_spec("conv2d_1").bits == 3
    assert cfg.act_spec("input_1", first_or_last=True).bits == 8
    skip = cfg.with_override(LayerOverride("dense", quantize=False))
    assert skip.weight_spec("dense") is None


def test_roundtrip_and_errors():
    cfg = QuantConfig(weight_bits=5, overrides=(LayerOverride("a*", act_bits=3),))
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="weight_bit"):
        QuantConfig.from_dict({"weight_bit": 4})
    with pytest.raises(ConfigError, match="17"):
        QuantConfig(act_bits=17)
    with pytest.raises(ConfigError, match="pattern"):
        QuantConfig.from_dict({"overrides": [{"act_bits": 4}]})
    with pytest.raises(ConfigError, match="bogus"):
        QuantConfig.from_dict({"overrides": [{"pattern": "x", "bogus": 1}]})
    with pytest.raises(ConfigError, match="conv"):
        LayerOverride("conv", weight_bits=1)

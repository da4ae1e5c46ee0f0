"""Grid files: schema validation (errors name the key and the choices) and expansion."""

from __future__ import annotations

from pathlib import Path

import pytest

from tinyptq.ablate.grid import BitSetting, Grid
from tinyptq.errors import ConfigError

ABLATIONS = Path(__file__).resolve().parents[2] / "ablations"


def test_expansion_covers_the_cartesian_product(tiny_grid):
    runs = Grid.from_dict(tiny_grid).expand()
    assert len(runs) == 2 * 2 * 2
    assert len({r.run_id for r in runs}) == 8
    assert {r.bits for r in runs} == {
        BitSetting(8, 8, "per_tensor"),
        BitSetting(4, 8, "per_tensor"),
    }
    off = [r for r in runs if r.toggles["cle"] == "off"]
    assert all("cle" not in r.stage_names() for r in off)
    mse = [r for r in runs if r.toggles["range_setting.weights"] == "mse"]
    assert all(r.pipeline["stages"][-1]["range_setting"]["weights"] == "mse" for r in mse)
    assert all(r.pipeline["quant"]["weight_bits"] == r.bits.weight_bits for r in runs)
    assert all(r.skip_reason is None for r in runs)


def test_expansion_is_deterministic(tiny_grid):
    a = [r.run_id for r in Grid.from_dict(tiny_grid).expand()]
    b = [r.run_id for r in Grid.from_dict(tiny_grid).expand()]
    assert a == b


def test_options_of_a_disabled_stage_share_one_computation(tiny_grid):
    tiny_grid["pipeline"]["stages"].append({"bias_correction": {"method": "empirical"}})
    tiny_grid["toggles"] = {
        "bias_correction": ["off", "on"],
        "bias_correction.method": ["empirical", "analytical"],
    }
    runs = Grid.from_dict(tiny_grid).expand()
    off = [r for r in runs if r.toggles["bias_correction"] == "off" and r.bits.weight_bits == 8]
    assert len(off) == 2 and off[0].config_hash == off[1].config_hash
    assert off[0].run_id != off[1].run_id  # one row per grid point, for with/without pairs
    on = [r for r in runs if r.toggles["bias_correction"] == "on" and r.bits.weight_bits == 8]
    assert on[0].config_hash != on[1].config_hash


def test_incompatible_stage_orders_are_skipped_with_a_reason(tiny_grid):
    tiny_grid["toggles"] = {"range_setting": ["off", "on"]}
    runs = Grid.from_dict(tiny_grid).expand()
    skipped = [r for r in runs if r.skip_reason]
    assert len(skipped) == 2 and all(r.toggles["range_setting"] == "off" for r in skipped)
    assert "no range_setting" in skipped[0].skip_reason

    tiny_grid["pipeline"]["stages"] = [{"range_setting": {}}, "bn_folding"]
    tiny_grid["toggles"] = {"bn_folding": ["off", "on"]}
    runs = Grid.from_dict(tiny_grid).expand()
    reasons = {r.toggles["bn_folding"]: r.skip_reason for r in runs}
    assert reasons["off"] is None
    assert reasons["on"] == "bn_folding must run before range_setting"


def test_bits_forms_and_granularity():
    grid = Grid.from_dict(
        {
            "use_cases": ["tiny-test"],
            "bits": ["W8A8", {"weights": 4, "activations": 4, "granularity": "per_channel"}],
            "granularity": ["per_tensor", "per_channel"],
            "pipeline": "minmax",
        }
    )
    assert grid.bits == [
        BitSetting(8, 8, "per_tensor"),
        BitSetting(8, 8, "per_channel"),
        BitSetting(4, 4, "per_channel"),
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": 1}, "unknown grid key 'colour'; valid: name, description, use_cases"),
        ({"use_cases": ["speech"]}, "grid option 'use_cases' must be one of 'ad', 'ic'"),
        ({"bits": ["W17A8"]}, "bits.weights"),
        ({"bits": ["8bit"]}, "bits entry '8bit' must look like 'W4A8'"),
        ({"bits": [{"weights": 4}]}, "needs both 'weights' and 'activations'"),
        (
            {"granularity": ["per_group"]},
            "grid option 'granularity' must be one of 'per_tensor', 'per_channel', got 'per_group'",
        ),
        (
            {"toggles": {"no_such_stage": ["off", "on"]}},
            "unknown stage 'no_such_stage' in toggle 'no_such_stage'; valid stages:",
        ),
        (
            {"toggles": {"bias_correction": ["off", "on"]}},
            "stage 'bias_correction' is not in the base pipeline",
        ),
        (
            {"toggles": {"cle": ["maybe"]}},
            "grid toggle option 'cle' must be on or off, got 'maybe'",
        ),
        (
            {"toggles": {"range_setting.weights": ["minmax", "best"]}},
            "grid toggle option 'range_setting.weights' must be one of 'kl', 'minmax'",
        ),
        (
            {"toggles": {"range_setting.colour": ["red"]}},
            "unknown option 'colour' for stage 'range_setting'; valid options:",
        ),
        ({"toggles": {"quant.speed": [1]}}, "unknown quant toggle 'speed'; valid:"),
        (
            {"calibration": {"samples": [0]}},
            "grid option 'calibration.samples' must be an integer >= 1, got 0",
        ),
        (
            {"calibration": {"size": [8]}},
            "unknown calibration key 'size'; valid: samples, batch_size",
        ),
        (
            {"seeds": ["zero"]},
            "grid option 'seeds' must be an integer in [0, 4294967295], got 'zero'",
        ),
        (
            {"pipeline": "no-such-pipeline"},
            "pipeline 'no-such-pipeline' is neither a file nor a built-in",
        ),
    ],
)
def test_schema_errors_name_the_key_and_choices(tiny_grid, change, message):
    tiny_grid.update(change)
    with pytest.raises(ConfigError) as err:
        Grid.from_dict(tiny_grid)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_required_key(tiny_grid):
    del tiny_grid["bits"]
    with pytest.raises(ConfigError, match="grid key 'bits' is missing"):
        Grid.from_dict(tiny_grid)


@pytest.mark.parametrize("name", ["kws", "ic", "vww", "ad", "all"])
def test_shipped_grids_parse(name):
    grid = Grid.from_yaml(ABLATIONS / f"{name}.yaml")
    runs = grid.expand()
    # the order rules these grids meet: cle with bn_folding off (their models all have batch
    # norms), and two rounding stages at once
    rounding = ("adaround", "brecq", "gptq")
    pairs = [r for r in runs if sum(r.toggles.get(k) == "on" for k in rounding) > 1]
    assert all("both round the weights" in r.skip_reason for r in pairs)
    others = [r for r in runs if r not in pairs]
    assert others and all(r.skip_reason in (None, "cle needs bn_folding before it") for r in others)
    off = [r for r in runs if r.toggles.get("bn_folding") == "off" and r.toggles.get("cle") == "on"]
    assert all(r.skip_reason for r in off)
    assert sum(r.skip_reason is None for r in runs) == len(runs) - len(off) - len(pairs)
    assert len({r.run_id for r in runs}) == len(runs)


def _rounding_grid(tiny_grid: dict) -> dict:
    """tiny_grid with two sub-grids: cle on/off at nearest rounding; the rounding axis with cle on."""
    tiny_grid["pipeline"]["stages"] += [{"adaround": {"iterations": 4}}, {"gptq": {}}]
    tiny_grid["toggles"] = [
        {"cle": ["off", "on"], "adaround": "off", "gptq": "off"},
        {"range_setting.weights": "mse", "adaround": ["off", "on"], "gptq": ["off", "on"]},
    ]
    return tiny_grid


def test_subgrids_expand_one_after_the_other_with_base_values_for_left_out_toggles(tiny_grid):
    grid = Grid.from_dict(_rounding_grid(tiny_grid))
    assert grid.toggles == {
        "cle": ["off", "on"],
        "adaround": ["off", "on"],
        "gptq": ["off", "on"],
        "range_setting.weights": ["mse"],
    }
    runs = grid.expand()
    # per bit setting: 2 points of sub-grid 1, 4 of sub-grid 2 (cle on: the base pipeline's value)
    assert len(runs) == 2 * (2 + 4) and len({r.run_id for r in runs}) == len(runs)
    first = [r for r in runs if r.toggles["range_setting.weights"] == "minmax"]
    assert len(first) == 4 and all(
        r.toggles["adaround"] == r.toggles["gptq"] == "off" for r in first
    )
    second = [r for r in runs if r.toggles["range_setting.weights"] == "mse"]
    assert all(r.toggles["cle"] == "on" for r in second)
    both = [r for r in second if r.toggles["adaround"] == r.toggles["gptq"] == "on"]
    assert len(both) == 2 and all("both round the weights" in r.skip_reason for r in both)
    ada = [r for r in second if r.toggles["adaround"] == "on" and r.toggles["gptq"] == "off"]
    assert [s for r in ada for s in r.stage_names()].count("adaround") == 2
    assert all(r.skip_reason is None and "gptq" not in r.stage_names() for r in ada)
    assert len(grid.to_dict()["subgrids"]) == 2


def test_a_point_two_subgrids_share_is_one_run(tiny_grid):
    tiny_grid["toggles"] = [
        {"cle": ["off", "on"]},
        {"cle": "on", "range_setting.weights": ["minmax", "mse"]},
    ]
    runs = Grid.from_dict(tiny_grid).expand()
    # sub-grid 1: cle off/on (minmax); sub-grid 2: minmax/mse (cle on): cle on + minmax is in both
    assert len(runs) == 2 * 3 and len({r.run_id for r in runs}) == len(runs)


@pytest.mark.parametrize(
    "toggles, message",
    [
        ([], "grid key 'toggles' is an empty list"),
        ([{"cle": ["off", "on"]}, ["cle"]], "grid key 'toggles' must be a mapping like"),
        (
            [{"cle": ["off", "on"]}, {"brecq": ["off", "on"]}],
            "stage 'brecq' is not in the base pipeline",
        ),
    ],
)
def test_subgrid_errors(tiny_grid, toggles, message):
    tiny_grid["toggles"] = toggles
    with pytest.raises(ConfigError, match=message):
        Grid.from_dict(tiny_grid)

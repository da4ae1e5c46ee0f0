"""Malformed inputs, generated from the declared constraints (not from a hand-written list).

Every value a user sets is declared once with a ``tinyptq.params`` constraint:
stage options (``Stage.parameter_constraints`` of every registered stage),
QuantConfig and override fields (``field_constraints``), a pipeline's
``calibration:`` keys, grid keys and toggles, and command-line options
(``CheckedOption``). Each constraint yields values it must reject (wrong type,
out of range, NaN, numbers as strings, booleans as strings) and valid values
on its boundaries. For every rejected value this module writes a pipeline
file, a grid file or a command line, runs the CLI in-process and asserts:
exit code 2, exactly one line on stderr naming the option, no traceback.
Boundary values must be accepted (checked by reading the spec only, nothing
runs). Validation comes before any work, so nothing already computed in an
output directory is touched by a malformed second invocation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from tests.ablate.conftest import grid_dict  # also registers the tiny-test use case
from tests.cli.test_cli import assert_one_line_error, run_cli
from tinyptq.ablate.grid import NOT_TOGGLED, Grid, toggle_constraint, value_constraints
from tinyptq.cli import CheckedOption, cli
from tinyptq.config import LayerOverride, QuantConfig
from tinyptq.errors import ConfigError
from tinyptq.params import Constraint, Integer
from tinyptq.pipeline import Stage, create_stage, register, registry
from tinyptq.pipeline_file import CALIBRATION_CONSTRAINTS, PipelineSpec


# ------------------------------------------------------------- generation
def stage_order() -> list[str]:
    """Every registered stage, in an order its requires / precedes declarations allow."""
    stages = registry()
    after: dict[str, set[str]] = {n: set() for n in stages}  # n -> stages that must follow n
    for name, cls in stages.items():
        for req in cls.requires:
            after[req].add(name)
        for later in cls.precedes:
            after[name].add(later)
    order, left = [], set(stages)
    while left:
        free = sorted(n for n in left if not any(n in after[m] for m in left))
        assert free, f"requires / precedes form a cycle among {sorted(left)}"
        order.append(free[0])
        left.remove(free[0])
    return order


def params(cases: dict[str, Constraint], kind: str) -> list[Any]:
    """pytest params (name, value) for every invalid or boundary example of every constraint."""
    out = []
    for name, constraint in cases.items():
        values = constraint.invalid_examples() if kind == "invalid" else constraint.boundary_examples()
        out += [pytest.param(name, v, id=f"{name}={v!r}") for v in values]
    return out


STAGES = stage_order()
STAGE_OPTIONS = {
    f"{stage}.{option}": c
    for stage in STAGES
    for option, c in registry()[stage].parameter_constraints.items()
}
QUANT_FIELDS = dict(QuantConfig.field_constraints)
OVERRIDE_FIELDS = dict(LayerOverride.field_constraints)
QUANT_TOGGLES = {f"quant.{f}": c for f, c in QUANT_FIELDS.items() if f not in NOT_TOGGLED}
GRID_VALUES = value_constraints()


SWITCHES = {stage: toggle_constraint(stage) for stage in STAGES}  # stage: [off, on]
TOGGLES = {**STAGE_OPTIONS, **QUANT_TOGGLES, **SWITCHES}

# where a value of each kind goes in a pipeline file, and what the error line names
PIPELINE_SURFACES = {
    "stage": (
        STAGE_OPTIONS,
        lambda key, v: base_pipeline({key.split(".")[0]: {key.split(".")[1]: v}}),
        lambda key: ["{} option '{}'".format(*key.split("."))],
    ),
    "quant": (
        QUANT_FIELDS,
        lambda key, v: base_pipeline(quant={key: v}),
        lambda key: [f"quant option '{key}'"],
    ),
    "override": (
        OVERRIDE_FIELDS,
        lambda key, v: base_pipeline(quant={"overrides": [{"pattern": "conv*", key: v}]}),
        lambda key: ["quant override", f"option '{key}'"],
    ),
    "calibration": (
        CALIBRATION_CONSTRAINTS,
        lambda key, v: base_pipeline(calibration={key: v}),
        lambda key: [f"calibration option '{key}'"],
    ),
}
PIPELINE_INVALID = [
    pytest.param(surface, *p.values, id=f"{surface}:{p.id}")
    for surface, (constraints, _, _) in PIPELINE_SURFACES.items()
    for p in params(constraints, "invalid")
]

# where each grid key's value goes in a grid file
GRID_PLACES = {
    "use_cases": lambda v: {"use_cases": [v]},
    "granularity": lambda v: {"granularity": [v]},
    "bits.weights": lambda v: {"bits": [{"weights": v, "activations": 8}]},
    "bits.activations": lambda v: {"bits": [{"weights": 8, "activations": v}]},
    "bits.granularity": lambda v: {"bits": [{"weights": 8, "activations": 8, "granularity": v}]},
    "calibration.samples": lambda v: {"calibration": {"samples": [v]}},
    "calibration.batch_size": lambda v: {"calibration": {"batch_size": v}},
    "seeds": lambda v: {"seeds": [v]},
}

# a command line that gets each command past click's own checks (required options)
COMMAND_ARGS = {
    "quantize": lambda tmp: ["--use-case", "ic", "--data-dir", tmp / "empty", "--out", tmp / "out"],
    "analyze": lambda tmp: ["--use-case", "ic", "--data-dir", tmp / "empty", "--out", tmp / "out"],
    "train": lambda tmp: ["--use-case", "kws", "--data-dir", tmp / "empty"],
    "ablate": lambda tmp: ["--grid", write_grid(tmp, base_grid()), "--out", tmp / "out", "--dry-run"],
}


def checked_options() -> dict[str, tuple[str, Constraint]]:
    """'command --option' -> (command, constraint) for every constrained CLI option."""
    return {
        f"{name} {p.opts[0]}": (name, p.constraint)
        for name, command in sorted(cli.commands.items())
        for p in command.params
        if isinstance(p, CheckedOption)
    }


CLI_OPTIONS = checked_options()
CLI_INVALID = [
    pytest.param(key, text, id=f"{key}={text!r}")
    for key, (_, c) in CLI_OPTIONS.items()
    for text in c.invalid_texts()
]
CLI_BOUNDARY = [
    pytest.param(key, text, id=f"{key}={text}")
    for key, (_, c) in CLI_OPTIONS.items()
    for text in (repr(v) for v in c.boundary_examples())
]


# ---------------------------------------------------------------- files
ROUNDING = {name for name, cls in registry().items() if cls.rounds_weights}


def base_pipeline(stage_options: dict[str, dict[str, Any]] | None = None, **keys: Any) -> dict:
    """Every registered stage in a valid order, with options where given.

    One rounding stage at most (a pipeline takes one): the one given options, else none.
    """
    stage_options = stage_options or {}
    rounding = next((s for s in stage_options if s in ROUNDING), None)
    kept = [s for s in STAGES if s not in ROUNDING or s == rounding]
    stages = [{s: stage_options[s]} if s in stage_options else s for s in kept]
    return {"name": "malformed", "stages": stages, **keys}


def base_grid(**changes: Any) -> dict:
    """A one-run grid over the base pipeline (ic: nothing is loaded for a dry run)."""
    toggled = {key.partition(".")[0] for key in changes.get("toggles", {})}
    grid = {
        "name": "malformed",
        "use_cases": ["ic"],
        "bits": ["W8A8"],
        "granularity": ["per_channel"],
        "pipeline": base_pipeline({s: {} for s in toggled & ROUNDING}),
    }
    grid.update(changes)
    return grid


def write_yaml(tmp: Path, name: str, data: dict) -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_grid(tmp: Path, data: dict) -> Path:
    return write_yaml(tmp, "grid.yaml", data)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No downloads, no cached models: a value that slipped through fails fast on missing data."""
    monkeypatch.setenv("TINYPTQ_OFFLINE", "1")
    monkeypatch.setenv("TINYPTQ_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()


def quantize_with(capsys, tmp: Path, pipeline: dict) -> tuple[int, str]:
    path = write_yaml(tmp, "pipeline.yaml", pipeline)
    code, _, err = run_cli(capsys, "quantize", *COMMAND_ARGS["quantize"](tmp), "--pipeline", path)
    return code, err


def ablate_with(capsys, tmp: Path, grid: dict) -> tuple[int, str]:
    code, _, err = run_cli(
        capsys, "ablate", "--grid", write_grid(tmp, grid), "--out", tmp / "out", "--dry-run"
    )
    return code, err


def assert_rejected(code: int, err: str, *needles: str) -> None:
    """Exit code 2, one line on stderr, no traceback, the option named with its constraint."""
    assert code == 2, err
    assert_one_line_error(code, err, *needles, "must be")


# ------------------------------------------------- every option is declared
def test_every_stage_option_has_a_declared_constraint():
    for name, cls in registry().items():
        assert cls.undeclared_params() == [], f"stage '{name}' has options without a constraint"
        assert set(cls.parameter_constraints) == set(cls.param_names()), name


def test_a_stage_with_an_undeclared_option_cannot_register():
    class Loose(Stage):
        name = "_test_loose"
        parameter_constraints = {"a": Integer(0, 3)}

        def __init__(self, a: int = 1, b: int = 2) -> None:
            self.a, self.b = a, b

    with pytest.raises(TypeError, match="undeclared: \\['b'\\]"):
        register(Loose)
    assert "_test_loose" not in registry()


def test_every_config_field_has_a_declared_constraint():
    assert set(QUANT_FIELDS) == {f.name for f in dataclasses.fields(QuantConfig)} - {"overrides"}
    assert set(OVERRIDE_FIELDS) == {f.name for f in dataclasses.fields(LayerOverride)}


def test_every_grid_key_and_command_has_a_generator():
    assert set(GRID_PLACES) == set(GRID_VALUES)
    assert {command for command, _ in CLI_OPTIONS.values()} <= set(COMMAND_ARGS)


def test_every_numeric_cli_option_is_checked():
    """An int / float click option would bypass the constraints (and truncate nothing, but check nothing)."""
    loose = [
        f"{name} {p.opts[0]}"
        for name, command in cli.commands.items()
        for p in command.params
        if isinstance(p, click.Option)
        and not isinstance(p, CheckedOption)
        and isinstance(p.type, (click.types.IntParamType, click.types.FloatParamType))
    ]
    assert loose == []


# -------------------------------------------------------- rejected values
@pytest.mark.parametrize(("surface", "name", "value"), PIPELINE_INVALID)
def test_bad_value_in_a_pipeline_file(capsys, tmp_path, surface, name, value):
    _, place, needle = PIPELINE_SURFACES[surface]
    code, err = quantize_with(capsys, tmp_path, place(name, value))
    assert_rejected(code, err, *needle(name))


@pytest.mark.parametrize(("key", "value"), params(GRID_VALUES, "invalid"))
def test_bad_grid_value(capsys, tmp_path, key, value):
    code, err = ablate_with(capsys, tmp_path, base_grid(**GRID_PLACES[key](value)))
    assert_rejected(code, err, f"grid option '{key}'")


@pytest.mark.parametrize(("key", "value"), params(TOGGLES, "invalid"))
def test_bad_grid_toggle_value(capsys, tmp_path, key, value):
    code, err = ablate_with(capsys, tmp_path, base_grid(toggles={key: [value]}))
    assert_rejected(code, err, f"grid toggle option '{key}'")


def test_booleans_as_strings_in_a_toggle_are_rejected(capsys, tmp_path):
    """The issue's case: two rows labelled false / true with identical numbers."""
    code, err = ablate_with(capsys, tmp_path, base_grid(toggles={"quant.act_symmetric": ["false", "true"]}))
    assert_rejected(code, err, "grid toggle option 'quant.act_symmetric' must be a boolean", "got 'false'")


@pytest.mark.parametrize(("key", "text"), CLI_INVALID)
def test_bad_command_line_value(capsys, tmp_path, key, text):
    command, _ = CLI_OPTIONS[key]
    option = key.split(" ")[1]
    code, _, err = run_cli(capsys, command, *COMMAND_ARGS[command](tmp_path), option, text)
    assert_rejected(code, err, f"command-line option '{option}'")


# ------------------------------------------------ boundary values accepted
def stage_options_with(stage: str, option: str, value: Any) -> dict[str, Any]:
    """Options holding ``value``: alone, or with the others at their upper boundaries when an
    option-combination check (``check_params``) needs room (e.g. num_quant_bins <= num_bins)."""
    try:
        create_stage(stage, {option: value})
        return {option: value}
    except ConfigError:
        cls = registry()[stage]
        others = {
            o: c.boundary_examples()[-1] for o, c in cls.parameter_constraints.items() if o != option
        }
        return {**others, option: value}


@pytest.mark.parametrize(("key", "value"), params(STAGE_OPTIONS, "boundary"))
def test_boundary_stage_option_is_accepted(key, value):
    stage, option = key.split(".")
    options = stage_options_with(stage, option, value)
    spec = PipelineSpec.from_dict(base_pipeline({stage: options}))
    built = {s.name: s for s in spec.build()}[stage]
    assert built.get_params()[option] == value


@pytest.mark.parametrize(("field", "value"), params(QUANT_FIELDS, "boundary"))
def test_boundary_quant_field_is_accepted(field, value):
    spec = PipelineSpec.from_dict(base_pipeline(quant={field: value}))
    assert getattr(spec.quant_config(), field) == value


@pytest.mark.parametrize(("field", "value"), params(OVERRIDE_FIELDS, "boundary"))
def test_boundary_override_field_is_accepted(field, value):
    override = {"pattern": "conv*", field: value}
    cfg = PipelineSpec.from_dict(base_pipeline(quant={"overrides": [override]})).quant_config()
    assert getattr(cfg.overrides[0], field) == value


@pytest.mark.parametrize(("key", "value"), params(CALIBRATION_CONSTRAINTS, "boundary"))
def test_boundary_calibration_value_is_accepted(key, value):
    spec = PipelineSpec.from_dict(base_pipeline(calibration={key: value}))
    assert spec.calibration[key] == value


@pytest.mark.parametrize(("key", "value"), params(GRID_VALUES, "boundary"))
def test_boundary_grid_value_is_accepted(key, value):
    runs = Grid.from_dict(base_grid(**GRID_PLACES[key](value))).expand()
    assert runs and all(r.skip_reason is None for r in runs)


@pytest.mark.parametrize(("key", "value"), params(TOGGLES, "boundary"))
def test_boundary_grid_toggle_value_is_accepted(key, value):
    stage, _, option = key.partition(".")
    stage_options = {}
    if option and stage != "quant":
        stage_options[stage] = {
            k: v for k, v in stage_options_with(stage, option, value).items() if k != option
        }
    if stage in ROUNDING:  # the one rounding stage of the base pipeline
        stage_options.setdefault(stage, {})
    grid = base_grid(pipeline=base_pipeline(stage_options), toggles={key: [value]})
    assert Grid.from_dict(grid).toggles[key]


@pytest.mark.parametrize(("key", "text"), CLI_BOUNDARY)
def test_boundary_command_line_value_is_accepted(capsys, tmp_path, key, text):
    """Past validation: a dry run succeeds; other commands stop at the missing data instead."""
    command, _ = CLI_OPTIONS[key]
    option = key.split(" ")[1]
    code, _, err = run_cli(capsys, command, *COMMAND_ARGS[command](tmp_path), option, text)
    assert f"option '{option}'" not in err
    if command == "ablate":
        assert code == 0, err
    else:
        assert_one_line_error(code, err, "not found")


# --------------------------------------------- nothing already computed lost
def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_malformed_second_invocation_leaves_stored_results_untouched(capsys, tmp_path):
    grid = grid_dict(samples=8)
    grid.update(bits=["W8A8"], toggles={})
    out = tmp_path / "results"
    good = write_yaml(tmp_path, "good.yaml", grid)
    code, _, err = run_cli(capsys, "ablate", "--grid", good, "--out", out, "--workers", "1", "--no-report")
    assert code == 0, err
    before = snapshot(out)
    assert "results.sqlite" in before
    bad_grids = {
        "bools.yaml": {**grid, "toggles": {"quant.act_symmetric": ["false", "true"]}},
        "seed.yaml": {**grid, "seeds": [-1]},
        "samples.yaml": {**grid, "calibration": {"samples": [2.5]}},
        "stage.yaml": {**grid, "toggles": {"range_setting.percentile": [10]}},
    }
    invocations = [["--grid", write_yaml(tmp_path, n, g)] for n, g in bad_grids.items()]
    invocations += [["--grid", good, "--workers", "0"], ["--grid", good, "--workers", "2.5"]]
    for args in invocations:
        code, _, err = run_cli(capsys, "ablate", *args, "--out", out, "--no-report")
        assert_rejected(code, err)
        assert snapshot(out) == before, args


def test_a_malformed_quantize_leaves_an_earlier_run_untouched(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"quantized": 88.4}')
    (out / "state.pkl").write_bytes(b"earlier run state")
    before = snapshot(out)
    bad = write_yaml(tmp_path, "bad.yaml", base_pipeline(quant={"act_symmetric": "false"}))
    base = ["quantize", "--use-case", "ic", "--data-dir", tmp_path / "empty", "--out", out]
    for args in (["--pipeline", bad], ["--calib-samples", "0"], ["--seed", "-1"], ["--calib-samples", "1.5"]):
        code, _, err = run_cli(capsys, *base, *args)
        assert_rejected(code, err)
        assert snapshot(out) == before, args


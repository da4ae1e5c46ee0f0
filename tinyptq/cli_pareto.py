"""The ``tinyptq pareto`` command (registered on the main group): accuracy against budgets."""

from __future__ import annotations

from pathlib import Path

import click

from tinyptq.cli import (
    _calib_filter_option,
    _data_dir_option,
    _eval_filter_option,
    _model_option,
    _use_case_option,
    cli,
)


@cli.command()
@_use_case_option
@click.option(
    "--pipeline",
    default="mixed_precision",
    show_default=True,
    help="Pipeline YAML file or built-in name; its mixed_precision stage (added before range_setting "
    "when missing) gets each budget.",
)
@click.option(
    "--budget",
    "budget_texts",
    multiple=True,
    required=True,
    help="NAME=V1,V2,... with NAME one of weight_kb, activation_kb, total_kb, bops, memory_io_kb; "
    "repeat for several budgets (every combination runs).",
)
@click.option(
    "--uniform",
    default="W8A8,W4A8,W3A8",
    show_default=True,
    help="Uniform bit-widths run as reference points ('' for none).",
)
@_calib_filter_option
@_eval_filter_option
@_model_option
@_data_dir_option
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output directory (default runs/pareto-<use case>); a rerun resumes.",
)
def pareto(
    use_case: str,
    pipeline: str,
    budget_texts: tuple[str, ...],
    uniform: str,
    calib_filter: dict[str, str] | None,
    eval_filter: dict[str, str] | None,
    model: Path | None,
    data_dir: Path | None,
    out: Path | None,
) -> None:
    """Sweep budgets: the pipeline with mixed precision at each one; write CSV, JSON and a plot."""
    from tinyptq import api
    from tinyptq.models.usecases import get_use_case
    from tinyptq.pareto import parse_budget, parse_uniform, sweep, write_outputs
    from tinyptq.paths import check_out_dir

    budgets = dict(parse_budget(t) for t in budget_texts)
    references = parse_uniform(uniform)
    spec = api.load_pipeline(pipeline)
    out = out or Path("runs") / f"pareto-{use_case}"
    check_out_dir(out, "--out")
    uc = get_use_case(use_case, data_dir)
    calib_where = uc.check_filter(calib_filter, "calibration filter")
    eval_where = uc.check_filter(eval_filter, "evaluation filter")
    graph = uc.load_graph(model)
    n = spec.calibration.get("samples", uc.calibration_size)
    seed = spec.calibration.get("seed", 0)
    calib = uc.calibration_data(n, seed, where=calib_where) if calib_where else uc.calibration_data(n, seed)
    graph.check_input(calib, f"{uc.name} calibration data")
    data, fp32_scores, _ = api._fp32_baseline(uc, graph, model, eval_where)
    rows = sweep(uc, graph, spec, calib, data, fp32_scores, budgets, references, out)
    paths = write_outputs(rows, list(budgets), out)
    for row in rows:
        value = "infeasible: " + row["error"] if row.get("value") is None else f"{row['value']:.2f}"
        size = "" if row.get("weight_bytes") is None else f", {row['weight_bytes'] / 1024:.1f} KiB weights"
        click.echo(f"{row['point']}: {value}{size}")
    for kind, path in paths.items():
        click.echo(f"{kind}: {path}")

"""The ``tinyptq ablate`` and ``tinyptq report`` commands (registered on the main group)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tinyptq.cli import _data_dir_option, checked_option, cli
from tinyptq.params import WORKERS


@cli.command()
@click.option(
    "--grid",
    "grid_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Grid file (e.g. ablations/kws.yaml).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output directory for the results store and the report (default runs/ablate-<grid name>).",
)
@checked_option(
    "--workers",
    constraint=WORKERS,
    default=None,
    help="Worker processes, >= 1 (default: the number of cores).",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Local worker processes, or a Ray cluster.",
)
@click.option(
    "--address", default=None, help="Ray cluster address (default: start a local Ray instance)."
)
@click.option("--retry-failed", is_flag=True, help="Run again the runs that failed last time.")
@click.option("--dry-run", is_flag=True, help="List the expanded runs and exit.")
@click.option("--no-report", is_flag=True, help="Do not write the report at the end.")
@click.option(
    "--rebuild-store",
    is_flag=True,
    help="Move OUT/results.sqlite aside (kept) and rebuild it from the run records in OUT/records.",
)
@_data_dir_option
def ablate(
    grid_path: Path,
    out: Path | None,
    workers: int | None,
    executor: str,
    address: str | None,
    retry_failed: bool,
    dry_run: bool,
    no_report: bool,
    rebuild_store: bool,
    data_dir: Path | None,
) -> None:
    """Run an ablation grid: toggle PTQ components across use cases and bit-widths.

    Finished runs in OUT are skipped, so rerunning the same command resumes.
    """
    from tinyptq.ablate.executors import cpu_count
    from tinyptq.ablate.grid import Grid
    from tinyptq.ablate.runner import describe, run_grid
    from tinyptq.ablate.store import DB_NAME, stored_statuses
    from tinyptq.errors import ConfigError

    grid = Grid.from_yaml(grid_path)
    out = out or Path("runs") / f"ablate-{grid.name}"
    if dry_run:
        if rebuild_store:
            raise ConfigError("--rebuild-store rebuilds the store before a run; it does nothing with --dry-run")
        runs = grid.expand()
        statuses = stored_statuses(out)  # read only: works beside a running grid
        for line in describe(runs, statuses):
            click.echo(line)
        distinct = len({r.config_hash for r in runs if r.skip_reason is None})
        skipped = sum(r.skip_reason is not None for r in runs)
        stored = sum(1 for r in runs if r.run_id in statuses)
        click.echo(
            f"{len(runs)} runs ({distinct} distinct computations, {skipped} skipped as incompatible, "
            f"{stored} already stored in {out})"
        )
        return
    from tinyptq.paths import check_out_dir

    check_out_dir(out, "--out")  # before the grid runs, not when its results are stored
    summary = run_grid(
        grid,
        out,
        workers=cpu_count() if workers is None else workers,
        executor=executor,
        address=address,
        data_dir=data_dir,
        retry_failed=retry_failed,
        rebuild=rebuild_store,
    )
    click.echo(f"{grid.name}: {summary.text()}")
    click.echo(f"results: {out / DB_NAME}")
    if not no_report:
        _echo_report(out)


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
def report(out_dir: Path) -> None:
    """Write CSV, Markdown and HTML (with plots) of an ablation's results in OUT_DIR."""
    from tinyptq.ablate.store import open_store
    from tinyptq.paths import check_out_dir

    open_store(out_dir)  # one-line error when there are no results
    check_out_dir(out_dir, "report directory")
    _echo_report(out_dir)


def _echo_report(out_dir: Path) -> None:
    from tinyptq.ablate.report import write_report

    paths = write_report(out_dir)
    for kind in ("csv", "md", "html"):
        if kind in paths:
            click.echo(f"{kind}: {paths[kind]}", file=sys.stdout)

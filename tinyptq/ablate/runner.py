"""The ablation runner: expand a grid, skip what is finished, run the rest, store every row.

Grid points whose toggles resolve to the same computation form one task; the
planner marks stage prefixes that several tasks share so the workers cache
them. Results are written to the store one transaction per finished task
(each run's record file first), so a killed grid resumes where it stopped.
One runner at a time owns an output directory: it holds ``OUT/ablate.lock``
for its lifetime, and a second runner on the same directory stops at once
(reading the store, as report and --dry-run do, needs no lock).
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tinyptq.ablate.executors import LocalExecutor, RayExecutor, make_executor
from tinyptq.ablate.grid import Grid, Run
from tinyptq.ablate.prefix import prefix_keys
from tinyptq.ablate.store import RECORDS_DIR, ResultStore, StoreError, rebuild_store
from tinyptq.ablate.worker import Task
from tinyptq.errors import TinyPTQError
from tinyptq.pipeline_file import PipelineSpec

LOCK_FILE = "ablate.lock"


class OutDirBusy(TinyPTQError):
    """Another runner holds the output directory."""


@contextmanager
def runner_lock(out_dir: str | Path) -> Iterator[None]:
    """Own ``out_dir`` for the block (``OUT/ablate.lock``, holding this pid); OutDirBusy when another runner does.

    The lock is an flock on the file: the system releases it when its holder
    ends, however it ends (a killed runner never leaves a stale lock).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise OutDirBusy(
                f"{out_dir} is in use by another 'tinyptq ablate' (pid {holder}); "
                f"wait until it has finished or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@dataclass
class GridSummary:
    """What a grid run did: counts per status, this time and in total."""

    total: int
    ran: int = 0
    reused: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def text(self) -> str:
        """'128 runs: 120 done, 2 failed, 6 skipped (100 run now, 28 already stored)'."""
        parts = ", ".join(f"{self.counts.get(s, 0)} {s}" for s in ("done", "failed", "skipped"))
        return f"{self.total} runs: {parts} ({self.ran} run now, {self.reused} already stored)"


def plan_tasks(
    runs: list[Run], cache_dir: Path, data_dir: str | None, log_dir: Path | None
) -> dict[str, Task]:
    """One task per distinct configuration, with the stage prefixes worth caching."""
    runnable = [r for r in runs if r.skip_reason is None]
    configs = {r.config_hash: r for r in runnable}
    prefix_users: dict[str, set[str]] = defaultdict(set)
    keys_of: dict[str, list[str]] = {}
    for h, run in configs.items():
        # the worker's disk cache tells use cases and calibration sets apart by content
        keys = prefix_keys(PipelineSpec.from_dict(run.pipeline), scope=(run.use_case, run.calib_samples))
        keys_of[h] = keys
        for key in keys:
            prefix_users[key].add(h)
    tasks = {}
    for h, run in configs.items():
        shared = [k + 1 for k, key in enumerate(keys_of[h]) if len(prefix_users[key]) > 1]
        tasks[h] = Task(
            config_hash=h,
            use_case=run.use_case,
            pipeline=run.pipeline,
            cache_dir=str(cache_dir),
            shared_prefixes=shared,
            data_dir=data_dir,
            log_dir=str(log_dir) if log_dir else None,
        )
    return tasks


def describe(runs: list[Run], statuses: dict[str, str] | None = None) -> list[str]:
    """One line per run for --dry-run: status, use case, bits, toggles, skip reason."""
    statuses = statuses or {}
    lines = []
    for r in runs:
        state = statuses.get(r.run_id) or ("skip" if r.skip_reason else "todo")
        reason = f"  ({r.skip_reason})" if r.skip_reason else ""
        lines.append(
            f"{r.run_id}  {state:7s} {r.use_case:10s} {r.bits.text:22s} calib {r.calib_samples:<5d}"
            f" seed {r.seed:<3d} {r.label}{reason}"
        )
    return lines


def _row(run: Run, grid: Grid, result: dict[str, Any]) -> dict[str, Any]:
    row = {
        "run_id": run.run_id,
        "config_hash": run.config_hash,
        "grid": grid.name,
        "label": run.label,
        "use_case": run.use_case,
        "weight_bits": run.bits.weight_bits,
        "act_bits": run.bits.act_bits,
        "granularity": run.bits.granularity,
        "calib_samples": run.calib_samples,
        "seed": run.seed,
        "toggles": run.toggles,
        "pipeline": run.pipeline["stages"],
    }
    row.update(result)
    return row


def run_grid(
    grid: Grid,
    out_dir: str | Path,
    workers: int = 1,
    executor: str = "local",
    address: str | None = None,
    data_dir: str | Path | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    stream: TextIO | None = None,
    rebuild: bool = False,
) -> GridSummary:
    """Run every grid point not yet in OUT_DIR's store; return the counts.

    ``rebuild`` first moves the store aside and rebuilds it from the run
    records (see ``store.rebuild_store``). OutDirBusy when another runner
    holds OUT_DIR; StoreError when the store cannot be used.
    """
    out_dir = Path(out_dir)
    stream = stream or sys.stderr
    runner = make_executor(executor, workers, address)
    with runner_lock(out_dir):
        store = _open_store(out_dir, rebuild, stream)
        return _run_todo(grid, store, runner, data_dir, retry_failed, progress, stream)


def _open_store(out_dir: Path, rebuild: bool, stream: TextIO) -> ResultStore:
    """The store, rebuilt first when asked, holding every run record (rows it lost come back)."""
    moved, restored = rebuild_store(out_dir) if rebuild else (None, 0)
    store = ResultStore(out_dir)
    restored += store.import_records()
    if rebuild or restored:
        where = f"moved {moved.name} aside; " if moved else ""
        print(f"{out_dir}: {where}restored {restored} runs from {out_dir / RECORDS_DIR}", file=stream)
    return store


def _run_todo(
    grid: Grid,
    store: ResultStore,
    runner: LocalExecutor | RayExecutor,
    data_dir: str | Path | None,
    retry_failed: bool,
    progress: bool,
    stream: TextIO,
) -> GridSummary:
    """Run the grid points ``store`` does not hold as finished; each result to the store as it comes."""
    from tqdm import tqdm

    out_dir = store.out_dir
    runs = grid.expand()
    _set_grid_meta(store, grid, runs)
    statuses = store.statuses()
    finished = {"done", "skipped"} | (set() if retry_failed else {"failed"})

    for run in runs:  # incompatible stage combinations: recorded, never run
        if run.skip_reason and statuses.get(run.run_id) != "skipped":
            store.put(_row(run, grid, {"status": "skipped", "error": run.skip_reason}))
    todo = [r for r in runs if r.skip_reason is None and statuses.get(r.run_id) not in finished]
    summary = GridSummary(total=len(runs), reused=len(runs) - len(todo))
    tasks = plan_tasks(
        runs, out_dir / "cache", str(data_dir) if data_dir else None, out_dir / "logs"
    )
    by_config: dict[str, list[Run]] = defaultdict(list)
    for run in todo:
        by_config[run.config_hash].append(run)
    pending = [tasks[h] for h in by_config]

    counts: Counter = Counter()
    store_failed = False
    bar = tqdm(
        total=len(runs),
        initial=summary.reused,
        desc=f"ablate {grid.name}",
        unit="run",
        file=stream,
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        for task, result in runner.run(pending):
            group = by_config[task.config_hash]
            for run in group:
                try:
                    store.put(_row(run, grid, result))
                except StoreError as exc:  # the run's record is written: the grid goes on
                    if not store_failed:
                        bar.write(f"warning: {exc}", file=stream)
                    store_failed = True
            counts[result["status"]] += len(group)
            summary.ran += len(group)
            bar.update(len(group))
            bar.set_postfix_str(f"done {counts['done']} failed {counts['failed']}", refresh=False)
            bar.write(_result_line(group[0], result), file=stream)
    finally:
        bar.close()
    store.import_records()  # what did not reach the store meanwhile; StoreError if it still cannot
    _set_grid_meta(store, grid, runs)  # again: the file may have been made anew meanwhile
    summary.counts = store.counts()
    return summary


def _set_grid_meta(store: ResultStore, grid: Grid, runs: list[Run]) -> None:
    store.set_meta("grid", grid.to_dict())
    store.set_meta("grid_name", grid.name)
    store.set_meta("run_ids", [r.run_id for r in runs])


def _result_line(run: Run, result: dict[str, Any]) -> str:
    head = f"[{result['status']}] {run.use_case} {run.bits.text} {run.label}"
    if result["status"] != "done":
        return f"{head}: {result.get('error', '')}"
    unit = result.get("metric_unit") or ""
    return f"{head}: {result['metric']} {result['value']:.2f}{' ' + unit if unit else ''} ({result['seconds']:.1f} s)"

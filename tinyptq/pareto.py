"""Budget sweeps: the most accurate model at each size / BOPs budget (``tinyptq pareto``).

The pipeline's stages before ``mixed_precision`` run once; for every budget
(every combination of the ``--budget`` lists) the rest of the pipeline runs on
a copy with the mixed-precision stage's budgets set, and the result is
evaluated with the configured target's arithmetic. Uniform bit-widths run the
same stages without mixed precision, as reference points. Sensitivity is
measured once and shared by every budget. Each finished point is appended to
``pareto.jsonl`` at once (a rerun skips points already there, so an
interrupted sweep resumes and nothing computed is lost); the table goes to
``pareto.csv`` and ``pareto.json``, the plot to ``pareto.png``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import ParameterGrid
from tqdm import tqdm

from tinyptq.allocation import BUDGETS
from tinyptq.cache import content_hash
from tinyptq.errors import ConfigError
from tinyptq.params import Real, validate
from tinyptq.pipeline import MemoryCache, Pipeline, PTQState, Stage, create_stage, order_problem
from tinyptq.quant import BITS

COST_KEYS = ("params", "weight_bytes", "macs", "bops", "peak_activation_bytes", "memory_io_bytes")
PLOT_AXIS = {  # budget -> (cost key, axis label, scale)
    "weight_kb": ("weight_bytes", "weight memory (KiB)", 1 / 1024),
    "activation_kb": ("peak_activation_bytes", "peak activation memory (KiB)", 1 / 1024),
    "total_kb": ("total_bytes", "weights + peak activations (KiB)", 1 / 1024),
    "bops": ("bops", "BOPs (10^9)", 1e-9),
    "memory_io_kb": ("memory_io_bytes", "memory I/O per inference (KiB)", 1 / 1024),
}


def parse_budget(text: str) -> tuple[str, list[float]]:
    """'weight_kb=8,10,12' -> ('weight_kb', [8.0, 10.0, 12.0]); ConfigError in one line otherwise."""
    name, sep, values = text.partition("=")
    name = name.strip()
    if not sep or name not in BUDGETS:
        raise ConfigError(f"--budget '{text}': expected NAME=V1,V2,... with NAME one of {', '.join(BUDGETS)}")
    out = []
    for v in values.split(","):
        value = Real(0.0, None, lo_open=True).from_text(v.strip())
        out.append(validate("--budget", name, value, Real(0.0, None, lo_open=True)))
    return name, out


def parse_uniform(text: str) -> list[tuple[int, int]]:
    """'W8A8,W4A8' -> [(8, 8), (4, 8)]."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        w, sep, a = item.upper().lstrip("W").partition("A")
        if not sep or not (w.isdigit() and a.isdigit()):
            raise ConfigError(f"--uniform '{item}': expected WnAm, e.g. W4A8")
        # checked here, in one line, not in the sweep (where a bad value would become an error row)
        bits = validate("--uniform", "weight bits", int(w), BITS), validate("--uniform", "act bits", int(a), BITS)
        out.append(bits)
    return out


def split_pipeline(stages: Sequence[Stage]) -> tuple[list[Stage], list[Stage]]:
    """(stages before mixed_precision, the rest from it); one is put before range_setting if missing."""
    names = [s.name for s in stages]
    if "mixed_precision" not in names:
        at = names.index("range_setting") if "range_setting" in names else len(names)
        stages = [*stages[:at], create_stage("mixed_precision", {"weight_kb": 1.0}), *stages[at:]]
        names = [s.name for s in stages]
    at = names.index("mixed_precision")
    return list(stages[:at]), list(stages[at:])


def with_budgets(stage: Stage, budgets: Mapping[str, float]) -> Stage:
    """A copy of a mixed_precision stage with exactly these budgets."""
    params = {**stage.get_params(), **{b: None for b in BUDGETS}, **budgets}
    return create_stage(stage.name, params)


def sweep(
    uc: Any,
    graph: Any,
    spec: Any,
    calib: Any,
    data: Any,
    fp32_scores: Any,
    budgets: Mapping[str, Sequence[float]],
    uniform: Sequence[tuple[int, int]],
    out: Path,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every budget point and uniform reference missing from ``out/pareto.jsonl``; return all rows."""
    from tinyptq.cost import CostModel
    from tinyptq.sim import target_predictor

    out.mkdir(parents=True, exist_ok=True)
    log = out / "pareto.jsonl"
    # rows of another request (use case, pipeline, calibration or evaluation data) in the same
    # directory stay in the log but are neither reused nor reported
    request = content_hash(
        uc.name, spec.to_dict(), hashlib.sha256(np.ascontiguousarray(calib).tobytes()).hexdigest(),
        hashlib.sha256(np.ascontiguousarray(data.x).tobytes()).hexdigest(),
    )
    rows = [r for r in read_log(log) if r.get("request") == request]
    done = {r["point"] for r in rows}
    config = spec.quant_config()
    prefix, rest = split_pipeline(Pipeline.from_spec(spec).stages)
    problem = order_problem([s.name for s in prefix + rest], batch_norms=bool(graph.batch_norm_names()))
    if problem is not None:
        raise ConfigError(f"pipeline '{spec.name}' cannot run: {problem}")
    points: list[tuple[str, dict[str, float] | None, tuple[int, int] | None]] = []
    for combo in ParameterGrid({k: list(v) for k, v in budgets.items()}):
        label = ",".join(f"{k}={combo[k]:g}" for k in budgets)
        points.append((label, dict(combo), None))
    points += [(f"W{w}A{a}", None, (w, a)) for w, a in uniform]
    todo = [p for p in points if p[0] not in done]
    if not todo:
        return rows
    seed = spec.calibration.get("seed", 0)
    start = time.perf_counter()
    base = Pipeline(prefix).run(PTQState(graph, config, calib, seed=seed, cache=MemoryCache()))
    prefix_seconds = time.perf_counter() - start
    cost = CostModel(base.graph)  # after the prefix: BN folding renames points
    fp32 = uc.metric(data, fp32_scores, fp32_scores)
    for label, combo, bits in tqdm(todo, desc=f"pareto {uc.name}", disable=not progress):
        start = time.perf_counter()
        row: dict[str, Any] = {"point": label, "request": request, "use_case": uc.name, "kind": "uniform" if bits else "mixed",
                               "budgets": combo, "fp32": fp32.value, "metric": fp32.name}
        try:
            if bits:
                stages = [s for s in rest if s.name != "mixed_precision"]
                state = base.evolve(copy_graph=True, config=config.replace(weight_bits=bits[0], act_bits=bits[1]))
            else:
                stages = [with_budgets(rest[0], combo), *rest[1:]]
                state = base.evolve(copy_graph=True)
            state = Pipeline(stages).run(state)
        except ConfigError as exc:  # e.g. an infeasible budget: recorded, the sweep goes on
            row.update(value=None, error=str(exc), seconds=round(time.perf_counter() - start, 2))
        else:
            metric = uc.metric(data, target_predictor(state)(data.x), fp32_scores)
            summary = cost.for_state(state).summary()
            mp = [r for r in state.log if r.stage == "mixed_precision"]
            row.update(
                value=metric.value,
                **summary,
                total_bytes=summary["weight_bytes"] + summary["peak_activation_bytes"],
                allocation=mp[0].details.get("allocation") if mp else None,
                seconds=round(time.perf_counter() - start, 2),
            )
        row["prefix_seconds"] = round(prefix_seconds, 2)
        rows.append(row)
        with log.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    return rows


def read_log(log: Path) -> list[dict[str, Any]]:
    """The finished points in ``pareto.jsonl`` (none when it is missing).

    A line cut short by an interrupted write is dropped, and the file rewritten
    without it, so that its point runs again and the next row starts on a line
    of its own.
    """
    if not log.exists():
        return []
    text = log.read_text()
    rows, damaged = [], not text.endswith("\n") and bool(text)
    for line in filter(str.strip, text.splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and "point" in row:
            rows.append(row)
        else:
            damaged = True
    if damaged:
        tmp = log.with_name(log.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(log)
    return rows


def write_outputs(rows: list[dict[str, Any]], budgets: Sequence[str], out: Path) -> dict[str, Path]:
    """pareto.csv, pareto.json and pareto.png in ``out``."""
    columns = ["point", "kind", "value", "metric", "fp32", *COST_KEYS, "total_bytes", "seconds", "error"]
    paths = {"csv": out / "pareto.csv", "json": out / "pareto.json", "png": out / "pareto.png"}
    with paths["csv"].open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    paths["json"].write_text(json.dumps(rows, indent=2))
    plot(rows, budgets[0] if budgets else "weight_kb", paths["png"])
    return paths


def plot(rows: list[dict[str, Any]], budget: str, path: Path) -> None:
    """The metric against the swept budget's cost: mixed-precision points joined, uniform ones marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label, scale = PLOT_AXIS[budget]
    ok = [r for r in rows if r.get("value") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    mixed = sorted((r[key] * scale, r["value"]) for r in ok if r["kind"] == "mixed")
    if mixed:
        ax.plot(*zip(*mixed, strict=True), marker="o", label="mixed precision")
    for r in (r for r in ok if r["kind"] == "uniform"):
        ax.scatter(r[key] * scale, r["value"], marker="s", color="tab:red")
        ax.annotate(r["point"], (r[key] * scale, r["value"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    if ok:
        ax.axhline(ok[0]["fp32"], color="k", ls="--", lw=0.8, label="FP32")
        ax.set(title=ok[0]["use_case"], xlabel=label, ylabel=f"{ok[0]['metric']} (%)")
    ax.scatter([], [], marker="s", color="tab:red", label="uniform")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

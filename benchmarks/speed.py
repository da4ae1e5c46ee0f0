"""Wall time and peak memory of every stage on every use case, and how the dominant stages scale.

Every use case runs every stage at W4A8, per-channel weights: the ``adaround``
pipeline (``bn_folding``, ``cle``, MSE ``range_setting``, ``adaround``,
empirical ``bias_correction``), ``brecq`` and ``gptq`` after range setting,
``mixed_precision`` (budget: the weight memory of uniform W4) after CLE, and
the simulated evaluation of the adaround result. Rounding stages run
``--iterations`` steps per unit (pipelines: 2000); their steady time per step
(every chunk of 50 compiled steps after a unit's first, which traces) gives
the time at 2000 iterations. The dominant stages then run on one model at
128, 512 and 2048 calibration samples; model size: the four MLPerf models.
Memory is the process's RSS (tracemalloc misses TensorFlow): its peak (VmHWM)
is reset before each stage through /proc/self/clear_refs; the increase over
the RSS before the stage is given too. Writes ``results/speed.{json,md,png}``::

    python benchmarks/speed.py --data-dir ../shared/data [--use-cases ic,kws] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402
from readme_block import replace_block  # noqa: E402
from tqdm import tqdm  # noqa: E402

import tinyptq  # noqa: E402
from tinyptq._tf import tf  # noqa: E402
from tinyptq.config import QuantConfig  # noqa: E402
from tinyptq.cost import CostModel  # noqa: E402
from tinyptq.models.usecases import get_use_case, use_case_names  # noqa: E402
from tinyptq.pipeline import Pipeline, PTQState, create_stage  # noqa: E402
from tinyptq.rounding import reconstruct  # noqa: E402
from tinyptq.sim import QuantSim  # noqa: E402

CONFIG = QuantConfig(weight_bits=4, act_bits=8, weight_per_channel=True)
# stage, options, the stage whose result it starts from (mixed_precision also gets a budget)
PLAN = [
    ("bn_folding", {}, None),
    ("cle", {}, "bn_folding"),
    ("range_setting", {"weights": "mse", "activations": "mse"}, "cle"),
    ("output_range_search", {}, "range_setting"),
    ("adaround", {}, "range_setting"),
    ("bias_correction", {"method": "empirical"}, "adaround"),
    ("brecq", {}, "range_setting"),
    ("gptq", {}, "range_setting"),
    ("mixed_precision", {"weight_candidates": [2, 3, 4, 6, 8], "act_candidates": [8]}, "cle"),
]
SCALED = ("range_setting", "bias_correction", "adaround", "brecq", "gptq")  # the dominant stages
ROUNDING = ("adaround", "brecq")
MLPERF = {"ad": "FC autoencoder", "ic": "ResNet-8", "kws-mlperf": "DS-CNN", "vww": "MobileNetV1"}
FULL_ITERATIONS = 2000
MIB = 1024 * 1024
CHUNKS: list[tuple[np.ndarray, list[int]]] = []  # per reconstructed unit: seconds and steps of each chunk


def _time_chunks(optimize):
    """Wrap ``_Reconstruction.optimize`` to record each chunk of steps' time and size (timing only)."""

    def timed(self, seed, progress):
        marks, steps = [time.perf_counter()], []

        def tick(rows: int) -> None:
            marks.append(time.perf_counter())
            steps.append(rows)
            progress(rows)

        optimize(self, seed, tick)
        CHUNKS.append((np.diff(marks), steps))

    return timed


reconstruct._Reconstruction.optimize = _time_chunks(reconstruct._Reconstruction.optimize)


# --------------------------------------------------------------- memory
def status_kib(key: str) -> int:
    """A VmRSS / VmHWM figure of /proc/self/status, KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (False where the kernel does not allow it)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_reset_works() -> bool:
    """Check the reset: a freed 256 MiB block must no longer count in the peak after it."""
    block = np.ones(256 * MIB // 8)
    del block
    gc.collect()
    counted = status_kib("VmHWM") > status_kib("VmRSS") + 200 * 1024
    return counted and reset_peak() and status_kib("VmHWM") < status_kib("VmRSS") + 128 * 1024


def measure(fn):
    """``fn()``, its wall and CPU time (all threads) and the process's memory around it (MiB)."""
    gc.collect()
    with contextlib.suppress(OSError):  # hand freed heap back to the OS: the RSS before is what is live
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = status_kib("VmRSS")
    reset_peak()
    start, cpu = time.perf_counter(), time.process_time()
    value = fn()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = status_kib("VmHWM")
    return value, {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), "peak_mib": round(peak / 1024, 1),
                   "increase_mib": round((peak - before) / 1024, 1)}


# --------------------------------------------------------------- runs
def w4_weight_kb(graph) -> float:
    """The weight memory (KiB) of the model at uniform W4A8: the mixed-precision budget."""
    return CostModel(graph).for_config(CONFIG).weight_bytes / 1024


def rounding_figures(record, chunks: list, iterations: int, seconds: float) -> dict:
    """Units, steady seconds per step (chunks after each unit's first) and the time at 2000 iterations."""
    units = len(record.details["units"])
    steps = sum(sum(rows[1:]) for _, rows in chunks)
    per_step = float(sum(t[1:].sum() for t, _ in chunks) / steps) if steps else None
    full = seconds + units * (FULL_ITERATIONS - iterations) * per_step if per_step else None
    return {"units": units, "iterations": iterations, "ms_per_step": per_step and round(1e3 * per_step, 3),
            "est_seconds_2000": full and round(full, 1)}


def run_use_case(name: str, args, samples: int, stages: tuple[str, ...], bar: tqdm) -> dict:
    """The listed stages of PLAN (and, when listed, ``evaluate``) on one use case: one row per stage."""
    uc = get_use_case(name, args.data_dir)
    graph = uc.load_graph()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calib = uc.calibration_data(samples, args.seed)
    cost = CostModel(graph).evaluate({}, {})
    states = {None: PTQState(graph.copy(), CONFIG, calib, seed=args.seed)}
    rows = []
    for stage, options, source in PLAN:
        if stage not in stages:
            continue
        bar.set_postfix_str(f"{name} n={len(calib)} {stage}")
        options = dict(options)
        if stage in ROUNDING:
            options["iterations"] = args.iterations
        if stage == "mixed_precision":
            options["weight_kb"] = round(w4_weight_kb(states[source].graph), 3)
        pipeline = Pipeline([create_stage(stage, options)])
        CHUNKS.clear()
        states[stage], row = measure(lambda p=pipeline, s=states[source]: p.run(s.evolve(copy_graph=True)))
        if stage in ROUNDING:
            row.update(rounding_figures(states[stage].log[-1], CHUNKS, args.iterations, row["seconds"]))
        rows.append({"stage": stage, "options": options, **row})
        bar.update()
    if "evaluate" in stages:
        data = uc.eval_set()
        bar.set_postfix_str(f"{name} evaluate")
        _, row = measure(lambda: QuantSim(states["bias_correction"]).predict(data.x))
        rows.append({"stage": "evaluate", "options": {"samples": len(data.x)}, **row})
        bar.update()
    return {"use_case": name, "samples": len(calib), "asked": samples, "params": cost.params,
            "macs": cost.macs, "layers": len(graph.quant_layers()), "rows": rows}


# --------------------------------------------------------------- output
def stage_table(runs: list[dict], fmt, total: bool = False) -> list[str]:
    """Rows: stages; columns: use cases; cells: ``fmt(row)``; optionally a row of total times."""
    stages = list(dict.fromkeys(r["stage"] for run in runs for r in run["rows"]))
    lines = ["| stage | " + " | ".join(run["use_case"] for run in runs) + " |", "|---|" + "---:|" * len(runs)]
    for stage in stages:
        cells = [next((fmt(r) for r in run["rows"] if r["stage"] == stage), "") for run in runs]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    if total:
        sums = [f"**{sum(r['seconds'] for r in run['rows']):.1f} ({sum(r['cpu_seconds'] for r in run['rows']):.1f})**"
                for run in runs]
        lines.append("| **total** | " + " | ".join(sums) + " |")
    return lines


def slope(sizes: list[int], times: list[float]) -> float:
    """Least-squares exponent of time against samples (log-log): 1 is linear, 0 independent."""
    return float(np.polyfit(np.log(sizes), np.log(np.maximum(times, 1e-6)), 1)[0])


def stage_times(run: dict, key: str = "seconds") -> dict[str, float]:
    """Stage -> time of one run."""
    return {r["stage"]: r[key] for r in run["rows"]}


def markdown(summary: dict) -> str:
    """The stamp and the five tables."""
    main, scaling, s, v = summary["use_cases"], summary["scaling"], summary["settings"], summary["versions"]
    used = ", ".join(f"{r['use_case']} {r['samples']}" for r in main)
    lines = [
        f"# Stage speed and memory ({summary['date']})", "",
        f"tinyptq {v['tinyptq']}, TensorFlow {v['tensorflow']}, onnxruntime {v['onnxruntime']}, numpy {v['numpy']}, "
        f"Python {v['python']}; {summary['cores']} cores, load average {summary['load_average'][0]:.1f} at the "
        f"start, {summary['load_average'][1]:.1f} at the end (a shared machine: wall times include waiting for "
        f"the CPU; CPU times, all threads, less so). Whole run: {summary['wall_seconds']:.0f} s.", "",
        f"Setting: W4A8, per-channel weights, seed {s['seed']}, {s['calib_samples']} calibration samples "
        f"(used: {used}); adaround and brecq at {s['iterations']} iterations per unit (pipelines: "
        f"{FULL_ITERATIONS}); mixed_precision: budget the weight memory of uniform W4, weight bits 2/3/4/6/8, "
        "activations 8; evaluate: the adaround result simulated on the evaluation set (first call, tracing "
        "included). Each stage starts from a copy of its input state.", "",
        "## Wall time per stage, s (CPU time in brackets)", "",
        *stage_table(main, lambda r: f"{r['seconds']:.1f} ({r['cpu_seconds']:.1f})", total=True), "",
        "## Peak RSS during the stage, MiB (in brackets the increase over the RSS before it)", "",
        f"Peak reset by /proc/self/clear_refs works here: {'yes' if summary['peak_reset_works'] else 'NO'} "
        "(otherwise the peaks are since the process started).", "",
        *stage_table(main, lambda r: f"{r['peak_mib']:.0f} (+{r['increase_mib']:.0f})"), "",
        f"## Rounding stages at {s['iterations']} iterations", "",
        "| use case | stage | units | wall s | steady ms / step | est. wall s at 2000 it. |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for run in main:
        for r in (r for r in run["rows"] if r["stage"] in ROUNDING):
            ms = f"{r['ms_per_step']:.2f}" if r["ms_per_step"] else "n/a"
            est = f"{r['est_seconds_2000']:.0f}" if r["est_seconds_2000"] else "n/a"
            lines.append(f"| {run['use_case']} | {r['stage']} | {r['units']} | {r['seconds']:.1f} | {ms} | {est} |")
    sizes = [run["samples"] for run in scaling]
    lines += ["", "Steady ms / step: the chunks of 50 compiled steps after each unit's first (which traces); "
              "the estimate adds that per step for the remaining iterations of every unit.", "",
              f"## Calibration-set size ({summary['scaling_use_case']}): wall s, CPU s (peak increase, MiB)", "",
              "| stage | " + " | ".join(f"{n} samples" for n in sizes) + " | exponent wall / CPU |",
              "|---|" + "---:|" * (len(sizes) + 1)]
    for stage in SCALED:
        cells = [next(r for r in run["rows"] if r["stage"] == stage) for run in scaling]
        exps = [slope(sizes, [c[k] for c in cells]) for k in ("seconds", "cpu_seconds")] if len(sizes) > 1 else []
        lines.append(f"| {stage} | " + " | ".join(
            f"{c['seconds']:.1f}, {c['cpu_seconds']:.1f} (+{c['increase_mib']:.0f})" for c in cells)
            + " | " + " / ".join(f"{e:.2f}" for e in exps) + " |")
    lines += ["", "Exponent: least-squares slope of log time against log samples (1 = linear in the "
              "calibration set, 0 = independent of it).", "",
              f"## Model size: the MLPerf models at {s['calib_samples']} samples, wall s", "",
              "| model | params | MACs | quant. layers | " + " | ".join(SCALED) + " | all stages | per layer |",
              "|---|---:|---:|---:|" + "---:|" * (len(SCALED) + 2)]
    for run in sorted((r for r in main if r["use_case"] in MLPERF), key=lambda r: r["macs"]):
        t, n = stage_times(run), run["layers"]
        lines.append(f"| {run['use_case']} ({MLPERF[run['use_case']]}) | {run['params']:,} | {run['macs']:,} | {n} | "
                     + " | ".join(f"{t[st]:.1f}" for st in SCALED) + f" | {sum(t.values()):.1f} | {sum(t.values()) / n:.1f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """Stacked stage times per use case; time and memory against samples; time against MACs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    main, scaling = summary["use_cases"], summary["scaling"]
    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    stages = list(dict.fromkeys(r["stage"] for run in main for r in run["rows"]))
    colors = dict(zip(stages, plt.cm.tab10.colors, strict=False))
    left = np.zeros(len(main))
    for stage in stages:
        t = np.array([stage_times(run).get(stage, 0.0) for run in main])
        ax[0, 0].barh([run["use_case"] for run in main], t, left=left, label=stage, color=colors[stage])
        left += t
    for y, total in enumerate(left):
        ax[0, 0].text(total, y, f" {total:.0f} s", va="center", fontsize=8)
    ax[0, 0].set(title=f"every stage: {summary['settings']['calib_samples']} samples, "
                 f"{summary['settings']['iterations']} rounding iterations", xlabel="wall time (s)",
                 xlim=(0, 1.12 * left.max()))
    ax[0, 0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=5)
    sizes = [run["samples"] for run in scaling]
    for stage in SCALED:
        ax[0, 1].plot(sizes, [stage_times(run)[stage] for run in scaling], "o-", label=stage, color=colors[stage])
        ax[1, 0].plot(sizes, [stage_times(run, "increase_mib")[stage] for run in scaling], "o-", label=stage,
                      color=colors[stage])
    start = max(stage_times(scaling[0])[st] for st in SCALED)
    ax[0, 1].plot(sizes, [start * n / sizes[0] for n in sizes], "k--", lw=0.8, label="linear in samples")
    name = summary["scaling_use_case"]
    ax[0, 1].set(title=f"{name}: time vs calibration samples", ylabel="wall time (s)", yscale="log")
    ax[1, 0].set(title=f"{name}: peak RSS increase vs calibration samples", ylabel="MiB over the RSS before")
    for a in (ax[0, 1], ax[1, 0]):
        a.set(xscale="log", xlabel="calibration samples", xticks=sizes)
        a.xaxis.set_major_formatter(ScalarFormatter())
        a.xaxis.set_minor_formatter(NullFormatter())
    models = sorted((r for r in main if r["use_case"] in MLPERF), key=lambda r: r["macs"])
    for stage in SCALED:
        ax[1, 1].plot([m["macs"] for m in models], [stage_times(m)[stage] for m in models], "o-", label=stage,
                      color=colors[stage])
    ax[1, 1].set(title="MLPerf models: time vs model size", xlabel="MACs per inference", ylabel="wall time (s)",
                 xscale="log", yscale="log")
    ax[1, 1].set_xticks([m["macs"] for m in models],
                        [f"{m['use_case']}\n{m['macs'] / 1e6:.2g} M\n{m['layers']} layers" for m in models], fontsize=7)
    ax[1, 1].xaxis.set_minor_formatter(NullFormatter())
    for a in ax.flat[1:]:
        a.legend(fontsize=7, loc="best")
        a.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def versions() -> dict[str, str]:
    """The versions the stamp names."""
    try:
        from onnxruntime import __version__ as ort
    except ImportError:
        ort = "not installed"
    return {"tinyptq": tinyptq.__version__, "tensorflow": tf.__version__, "onnxruntime": ort,
            "numpy": np.__version__, "python": platform.python_version()}


def main() -> None:
    """Every stage on every use case, then the calibration-size runs; write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("TINYPTQ_DATA_DIR"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--use-cases", help="comma-separated (default: all; --quick: ad)")
    parser.add_argument("--scaling-use-case", help="the model of the calibration-size runs (default: ic)")
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--scaling-samples", default="128,512,2048")
    parser.add_argument("--iterations", type=int, default=100, help="adaround / brecq steps per unit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: ad only, 32 and 64 samples")
    args = parser.parse_args()
    if args.quick:
        args.use_cases = args.use_cases or "ad"
        args.scaling_use_case = args.scaling_use_case or "ad"
        args.calib_samples, args.scaling_samples = 32, "32,64"
    names = (args.use_cases or ",".join(use_case_names())).split(",")
    scaling_name = args.scaling_use_case or "ic"
    sizes = [int(n) for n in args.scaling_samples.split(",")]
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    reset_ok = peak_reset_works()
    every, scaled = (*(p[0] for p in PLAN), "evaluate"), ("bn_folding", "cle", *SCALED)
    jobs = []  # the calibration-size runs right after their model's main run: the same process state
    for name in names:
        jobs.append((name, args.calib_samples, every))
        if name == scaling_name:
            jobs += [(name, n, scaled) for n in sizes if n != args.calib_samples]
    if scaling_name not in names:
        jobs += [(scaling_name, n, scaled) for n in sizes]
    bar = tqdm(total=sum(len(stages) for *_, stages in jobs), desc="speed", unit="stage")
    runs = {(name, n): run_use_case(name, args, n, stages, bar) for name, n, stages in jobs}
    bar.close()
    summary = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions(),
        "cores": os.cpu_count(),
        "load_average": [load0, os.getloadavg()[0]],
        "wall_seconds": round(time.perf_counter() - start, 1),
        "peak_reset_works": reset_ok,
        "settings": {"bits": "W4A8", "per_channel": True, "calib_samples": args.calib_samples,
                     "iterations": args.iterations, "seed": args.seed, "quick": args.quick},
        "use_cases": [runs[(n, args.calib_samples)] for n in names],
        "scaling_use_case": scaling_name,
        "scaling": [runs[(scaling_name, n)] for n in sizes],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(summary, indent=2))
    (out / "speed.md").write_text(markdown(summary))
    plot(summary, out / "speed.png")
    print(markdown(summary))
    if out.resolve() == (Path(__file__).parent / "results").resolve() and not args.quick:
        replace_block("speed", readme_text(markdown(summary)))


def readme_text(md: str) -> str:
    """What the README shows: the stamp, the setting and the wall time per stage (the rest stays in speed.md)."""
    title, rest = md.split("\n", 1)
    head = rest.split("\n## Peak RSS", 1)[0].strip().replace("\n## ", "\n#### ")
    return (
        f"**{title.lstrip('# ')}**, from `benchmarks/speed.py`:\n\n{head}\n\n"
        "Peak memory per stage, the rounding stages' time per step, and how the dominant stages scale with "
        "the calibration set and the model: [benchmarks/results/speed.md](benchmarks/results/speed.md).\n\n"
        "![time per stage and its scaling](benchmarks/results/speed.png)\n"
    )


if __name__ == "__main__":
    main()

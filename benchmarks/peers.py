"""tinyptq against the tools users would pick instead, side by side on the same data.

Every tool gets the same float model, the same calibration samples and the same
evaluation inputs (``peer_prep.py`` writes them once per use case), runs in its
own process (its own virtual environment where its dependencies clash with
ours: ``benchmarks/peers_setup.sh``) through a small driver in
``benchmarks/peer_drivers/``, and answers with its quantized model's outputs.
The metric is computed here, with one code path for every tool. Per run:
the metric, the tool's PTQ time (``quantize_seconds``: the quantization call
alone), the process's wall time and its peak resident memory (the driver reads
its own high-water mark).

The tools and their methods (each driver's docstring says exactly what it
calls):

- ``onnxruntime``: ``quantize_static``, QDQ, per-channel; MinMax, Entropy,
  Percentile; int8 and int4 types;
- ``tflite``: the TFLite converter's full-integer int8 PTQ, run in the
  TFLite interpreter;
- ``aimet``: AIMET-ONNX; min-max and SQNR range schemes, BN folding + AdaRound;
- ``mct``: Sony MCT on the Keras model; PTQ, gradient-based PTQ, mixed
  precision under a weight-memory budget;
- ``tinyptq``: its built-in ``minmax`` baseline, its ``adaround`` recipe (BN
  folding, CLE, MSE ranges, AdaRound, bias correction), ``gptq`` where the
  fast methods run, and mixed precision.

Settings: W8A8, W4A8, W3A8 and W4A4 with every layer and the model input at
those bits, plus "mixed": weight bits chosen per layer (2, 4 or 8) under the
weight memory of the tool's own uniform W4 model, activations at 8 bits. A
tool without a setting answers so, and the table says why. AdaRound (tinyptq's
and AIMET's) runs at every setting, MCT's gradient-based PTQ at W4A8 only
(about five minutes a run); the label-free use cases (kws-mlperf by default, vww on
request) run the fast methods at W4A8 only.

Two runs go at a time (``--jobs``), each pinned to its own core with its
libraries told to use one thread, so every tool's time is a one-core time.
Rows are appended to ``<out>/peers.jsonl`` as they finish; a rerun skips the
rows already there (delete the file, or pass ``--fresh``, to start over).
Usage::

    bash benchmarks/peers_setup.sh          # once: the peers' environments
    python benchmarks/peers.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from peer_prep import prepare  # noqa: E402
from peer_report import readme_block, write_reports  # noqa: E402
from readme_block import replace_block  # noqa: E402

from tinyptq.metrics import accuracy, top1_agreement  # noqa: E402

HERE = Path(__file__).parent
DRIVERS = HERE / "peer_drivers"
RESULTS = HERE / "results"
PEERS_DIR = Path(os.environ.get("TINYPTQ_PEERS_DIR", Path.home() / ".cache" / "tinyptq" / "peers"))

#: setting label -> (weight bits, activation bits)
SETTINGS = {"W8A8": (8, 8), "W4A8": (4, 8), "W3A8": (3, 8), "W4A4": (4, 4), "mixed": (4, 8)}
LABELLED = ("ic", "kws")
LABEL_FREE = ("kws-mlperf", "vww")
LABEL_FREE_SETTINGS = ("W4A8",)
SLOW = {"adaround", "adaround_a4", "gptq", "mixed", "brecq_qdrop"}

#: tool -> (virtual environment under PEERS_DIR, or None for this Python; driver; distribution for the version)
TOOLS = {
    "tinyptq": (None, "tinyptq_recipe.py", "tinyptq"),
    "onnxruntime": (None, "ort_static.py", "onnxruntime"),
    "tflite": (None, "tflite_ptq.py", "tensorflow"),
    "aimet": ("aimet", "aimet_onnx.py", "aimet-onnx"),
    "mct": ("mct", "mct_keras.py", "model-compression-toolkit"),
}


def methods(tool: str, setting: str, label_free: bool) -> list[str]:
    """The methods of ``tool`` run at ``setting`` (unsupported ones run too, and answer so).

    Weight rounding (AdaRound, gradient-based PTQ) does not run on the label-free
    use cases, which get the fast methods.
    """
    if setting == "mixed":
        return ["mixed"] if tool in ("tinyptq", "mct") else []
    fast = {
        "tinyptq": ["minmax", "gptq"] if label_free else ["minmax"],
        "onnxruntime": ["minmax", "entropy", "percentile"],
        "tflite": ["int8"],
        "aimet": ["minmax", "sqnr"],
        "mct": ["ptq"],
    }[tool]
    if label_free:
        return fast
    slow = {"tinyptq": ["adaround"], "aimet": ["adaround"]}
    if SETTINGS[setting][1] < 8:  # tinyptq's recipe for low-bit activations
        slow["tinyptq"] = ["adaround", "adaround_a4"]
    if setting == "W4A8":  # MCT's GPTQ: ~5 min a run, and below its own PTQ at W4A8 (see the note in peers.md)
        slow["mct"] = ["gptq"]
    return fast + slow.get(tool, [])


def python_of(tool: str, peers_dir: Path) -> Path | None:
    """The interpreter that runs ``tool``'s driver; None when its environment is missing."""
    venv = TOOLS[tool][0]
    if venv is None:
        return Path(sys.executable)
    exe = peers_dir / venv / "bin" / "python"
    return exe if exe.exists() else None


def version_of(tool: str, python: Path) -> str:
    """The installed version of the tool's distribution, asked of its own interpreter."""
    code = f"import importlib.metadata as m; print(m.version({TOOLS[tool][2]!r}))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
    return out.stdout.strip() or "unknown"


def run_job(python: Path, tool: str, job: dict, timeout: float, cpu: int | None = None) -> dict:
    """Run one driver in its own process; its answer (with its peak memory) plus the wall time.

    ``cpu``: the one core the process may use (its libraries then size their
    thread pools to one core); None lets it use them all.
    """
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("result.json", "scores.npy"):
        (out / stale).unlink(missing_ok=True)
    (out / "job.json").write_text(json.dumps(job, indent=2))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONHASHSEED": "0"}
    # tf_keras is ours: a peer's own TensorFlow (MCT's) has its own Keras
    env.pop("TF_USE_LEGACY_KERAS", None)
    if TOOLS[tool][0] is None:
        env["TF_USE_LEGACY_KERAS"] = "1"
    if cpu is not None:
        env.update({k: "1" for k in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")})
    start = time.perf_counter()
    with (out / "log.txt").open("w") as log:
        pin = ["taskset", "--cpu-list", str(cpu)] if cpu is not None else []
        proc = subprocess.Popen(
            [*pin, str(python), str(DRIVERS / TOOLS[tool][1]), str(out / "job.json")],
            stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    facts = {"wall_seconds": round(time.perf_counter() - start, 2)}
    result_path = out / "result.json"
    if result_path.exists() and (proc.returncode == 0 or "unsupported" in result_path.read_text()):
        result = json.loads(result_path.read_text())
        if "unsupported" in result:
            return {**facts, "status": "unsupported", "reason": result["unsupported"]}
        return {**facts, "status": "ok", **result}
    tail = [ln for ln in (out / "log.txt").read_text(errors="replace").splitlines() if ln.strip()]
    reason = "timed out" if facts["wall_seconds"] > timeout else (tail[-1][:200] if tail else f"exit {proc.returncode}")
    return {**facts, "status": "failed", "reason": reason}


def score(meta: dict, folder: Path, scores: np.ndarray) -> float:
    """The use case's metric of ``scores``: accuracy with labels, else top-1 agreement with FP32."""
    if meta["labelled"]:
        return accuracy(np.load(folder / "eval_y.npy"), scores)
    return top1_agreement(np.load(folder / "fp32_scores.npy"), scores)


def plan(use_cases: list[str], tools: list[str], settings: list[str]) -> list[tuple[str, str, str, str]]:
    """Every (use case, setting, tool, method) to run, in order."""
    jobs = []
    for uc in use_cases:
        label_free = uc not in LABELLED
        for setting in settings:
            if label_free and setting not in LABEL_FREE_SETTINGS:
                continue
            for tool in tools:
                jobs += [(uc, setting, tool, m) for m in methods(tool, setting, label_free)]
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("TINYPTQ_DATA_DIR"))
    parser.add_argument(
        "--use-cases", default=",".join((*LABELLED, LABEL_FREE[0])), help="also: vww (label-free, ~10 min more)"
    )
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run before it is killed")
    parser.add_argument("--peers-dir", default=str(PEERS_DIR), help="where peers_setup.sh put the environments")
    parser.add_argument("--work", default=None, help="shared inputs and per-run folders (default: <peers-dir>/work)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1),
        help="runs at a time, each pinned to its own core (1: one run at a time on every core)",
    )
    parser.add_argument("--fresh", action="store_true", help="forget the rows of an earlier run")
    args = parser.parse_args()
    if args.data_dir:  # tinyptq's driver evaluates through its use case, in a process of its own
        os.environ["TINYPTQ_DATA_DIR"] = str(Path(args.data_dir).resolve())
    for flag, given, valid in (("--tools", args.tools, TOOLS), ("--settings", args.settings, SETTINGS)):
        unknown = [x for x in given.split(",") if x not in valid]
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(unknown)} (valid: {', '.join(valid)})")
    peers_dir = Path(args.peers_dir)
    work = Path(args.work) if args.work else peers_dir / "work"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "peers.jsonl"
    if args.fresh:
        log.unlink(missing_ok=True)
        (out / "peers_parts.jsonl").unlink(missing_ok=True)
    earlier = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()] if log.exists() else []
    # per run, the latest answer; failed runs are run again
    latest = {(r["use_case"], r["setting"], r["tool"], r["method"]): r for r in earlier if r["status"] in ("ok", "unsupported")}
    done, rows = set(latest), list(latest.values())

    tools = args.tools.split(",")
    pythons = {t: python_of(t, peers_dir) for t in tools}
    versions = {t: version_of(t, p) if p else "not installed" for t, p in pythons.items()}
    use_cases = args.use_cases.split(",")
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    metas = {}
    for name in tqdm(use_cases, desc="shared inputs"):
        metas[name] = prepare(name, args.data_dir, work, args.calib_samples, args.seed)
    prep_seconds = time.perf_counter() - started
    jobs = [j for j in plan(use_cases, tools, args.settings.split(",")) if j not in done]
    jobs.sort(key=lambda j: j[3] not in SLOW)  # the long runs first: the two cores finish together
    lock = threading.Lock()
    cpus = sorted(os.sched_getaffinity(0))[: args.jobs] if args.jobs > 1 else [None]
    free = queue.SimpleQueue()
    for cpu in cpus:
        free.put(cpu)

    def one(uc: str, setting: str, tool: str, method: str) -> None:
        folder = work / uc
        w, a = SETTINGS[setting]
        row = {"use_case": uc, "setting": setting, "tool": tool, "method": method, "weight_bits": w, "act_bits": a}
        if pythons[tool] is None:
            row.update(status="not installed", reason=f"no environment in {peers_dir} (run benchmarks/peers_setup.sh)")
        else:
            job = {
                **row, "seed": args.seed,
                # the mixed setting's budget for tools that count kernels only: the uniform W-bit kernels
                "options": {"weight_bytes": metas[uc]["kernel_params"] * w // 8},
                "model_h5": str(folder / "model.h5"), "model_onnx": str(folder / "model.onnx"),
                "calib": str(folder / "calib.npy"), "eval_x": str(folder / "eval_x.npy"),
                "out": str(folder / "runs" / f"{setting}-{tool}-{method}"),
            }
            cpu = free.get()
            try:
                row.update(run_job(pythons[tool], tool, job, args.timeout, cpu))
            finally:
                free.put(cpu)
            row["cpu"] = "all" if cpu is None else f"core {cpu}"
            if row["status"] == "ok":
                row["value"] = score(metas[uc], folder, np.load(Path(job["out"]) / "scores.npy"))
        row.update(metric=metas[uc]["metric"], fp32=metas[uc]["fp32"])
        with lock:
            rows.append(row)
            with log.open("a") as fh:
                fh.write(json.dumps(row) + "\n")

    with ThreadPoolExecutor(max_workers=len(cpus)) as pool:
        futures = [pool.submit(one, *j) for j in jobs]
        for future in tqdm(as_completed(futures), total=len(futures), desc="runs"):
            future.result()
    stamp = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cores": os.cpu_count(),
        "jobs": len(cpus),
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "python": sys.version.split()[0],
        "versions": versions,
        "calib_samples": args.calib_samples,
        "seed": args.seed,
        "prepare_seconds": round(prep_seconds, 1),
        "run_seconds": round(time.perf_counter() - started - prep_seconds, 1),
        "use_cases": metas,
    }
    part = {k: v for k, v in stamp.items() if k in ("date", "load_average", "run_seconds")}
    part.update(tools=tools, runs=len(jobs))
    if jobs:  # a run that only rewrites the report is no part
        with (out / "peers_parts.jsonl").open("a") as fh:
            fh.write(json.dumps(part) + "\n")
    parts_log = out / "peers_parts.jsonl"
    stamp["parts"] = [json.loads(ln) for ln in parts_log.read_text().splitlines() if ln.strip()] if parts_log.exists() else []
    print(write_reports(rows, stamp, out))
    if Path(args.out).resolve() == RESULTS.resolve() and replace_block("peers", readme_block(rows, stamp)):
        print("README.md: the peers block now shows this run")


if __name__ == "__main__":
    main()

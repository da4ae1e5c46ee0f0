"""What a worker process does with one task: run a pipeline, measure, report back.

A worker keeps each use case's model, evaluation set and calibration sets in
memory between tasks. Work shared by several tasks goes through the grid's disk
cache: the FP32 metric once per use case, and the PTQ state after each stage
prefix the planner marked as shared (e.g. bn_folding + cle), keyed by the
content of model, calibration data, stages with options and, when a stage in
the prefix depends on them, the quantization settings. An entry that cannot
be used (damaged, foreign, stale) is computed again and replaced.
"""

from __future__ import annotations

import hashlib
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinyptq.ablate.disk_cache import MISSING, DiskCache, locked
from tinyptq.ablate.prefix import prefix_keys, uses_quant_config
from tinyptq.errors import TinyPTQError, first_line


@dataclass
class Task:
    """One distinct configuration to compute (several grid points may share it)."""

    config_hash: str
    use_case: str
    pipeline: dict[str, Any]  # PipelineSpec.to_dict() with bits and calibration filled in
    cache_dir: str
    shared_prefixes: list[int] = field(default_factory=list)  # stage counts worth caching
    data_dir: str | None = None
    model: str | None = None
    log_dir: str | None = None
    threads: int | None = None


_MEMO: dict[Any, Any] = {}  # per-process: use cases, graphs, evaluation and calibration data


def _set_threads(threads: int | None) -> None:
    """TensorFlow threads of this worker process (takes effect before TF runs anything)."""
    if threads and not _MEMO.get("threads_set"):
        from tinyptq._tf import tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:
            pass  # TF already running in this process
        _MEMO["threads_set"] = True


def execute(task: Task) -> dict[str, Any]:
    """Run one task; failures come back as a result with status 'failed' and the error."""
    start = time.perf_counter()
    try:
        _set_threads(task.threads)
        result = _run(task)
        result["status"] = "done"
    except TinyPTQError as exc:
        result = {"status": "failed", "error": str(exc)}
    except Exception as exc:  # one bad configuration must not stop the grid
        name, reason = type(exc).__name__, first_line(exc, 300)
        error = name if reason == name else f"{name}: {reason}"
        result = {"status": "failed", "error": error[:300]}
        _write_log(task, traceback.format_exc())
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def _write_log(task: Task, text: str) -> None:
    if task.log_dir:
        path = Path(task.log_dir) / f"{task.config_hash}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _array_key(x) -> str:
    return hashlib.sha256(memoryview(x.tobytes())).hexdigest()[:16] + str(x.shape)


def _use_case(task: Task):
    from tinyptq.models.usecases import get_use_case

    key = ("uc", task.use_case, task.data_dir, task.model, task.cache_dir)
    if key not in _MEMO:
        uc = get_use_case(task.use_case, task.data_dir)
        # one worker prepares a missing model (e.g. trains kws) while the others wait
        with locked(Path(task.cache_dir) / f"prepare-{task.use_case}.lock"):
            graph = uc.load_graph(task.model)
        data = uc.eval_set()
        graph.check_input(data.x, f"{uc.name} evaluation data")
        fingerprint = graph.fingerprint()
        fp32 = DiskCache(task.cache_dir, scope=(fingerprint, _array_key(data.x))).get_or_compute(
            "fp32", task.use_case, lambda: _fp32(uc, graph, data), valid=_is_fp32
        )
        _MEMO[key] = (uc, graph, fingerprint, data, fp32)
    return _MEMO[key]


def _cost_model(graph):
    """The cost model of ``graph`` (built once per graph as it is: a float run and a MAC count)."""
    from tinyptq.cost import CostModel

    key = ("cost", graph.fingerprint())
    if key not in _MEMO:
        _MEMO[key] = CostModel(graph)
    return _MEMO[key]


def _fp32(uc, graph, data) -> dict[str, Any]:
    scores = graph.predict(data.x)
    return {"scores": scores, "metric": uc.metric(data, scores, scores)}


def _is_fp32(value: Any) -> bool:
    return isinstance(value, dict) and {"scores", "metric"} <= set(value)


def _calibration(task: Task, uc, graph, n: int, seed: int):
    key = ("calib", task.use_case, task.data_dir, n, seed)
    if key not in _MEMO:
        calib = uc.calibration_data(n, seed)
        graph.check_input(calib, f"{uc.name} calibration data")
        _MEMO[key] = (calib, _array_key(calib))
    return _MEMO[key]


def _run(task: Task) -> dict[str, Any]:
    from tinyptq.pipeline import Pipeline, PTQState
    from tinyptq.pipeline_file import PipelineSpec
    from tinyptq.sim import target_predictor

    uc, base_graph, fingerprint, data, fp32 = _use_case(task)
    spec = PipelineSpec.from_dict(task.pipeline)
    stages = spec.build()
    config = spec.quant_config()
    seed = int(spec.calibration.get("seed", 0))
    calib, calib_key = _calibration(task, uc, base_graph, int(spec.calibration["samples"]), seed)
    cache = DiskCache(task.cache_dir, scope=(fingerprint, calib_key))
    keys = prefix_keys(spec)  # keys[k - 1]: the state after the first k stages

    state = PTQState(graph=base_graph.copy(), config=config, calib=calib, seed=seed, cache=cache)
    state, done = _cached_prefixes(state, stages, keys, task.shared_prefixes, cache)
    state = Pipeline(stages[done:]).run(state)

    quant = uc.metric(data, target_predictor(state)(data.x), fp32["scores"])
    ref = fp32["metric"]
    cost = _cost_model(state.graph).for_state(state).summary()
    fp32_cost = _cost_model(base_graph).evaluate({}, {}).summary()
    return {
        "metric": quant.name,
        "metric_unit": quant.unit,
        "value": float(quant.value),
        "fp32_metric": ref.name,
        "fp32": float(ref.value),
        "delta": float(quant.value - ref.value) if quant.name == ref.name else None,
        "extras": {**{k: float(v) for k, v in quant.extras.items()}, "cached_stages": done},
        **cost,  # params, weight_bytes, macs, bops, peak_activation_bytes, memory_io_bytes
        "fp32_weight_bytes": fp32_cost["weight_bytes"],
        "fp32_bops": fp32_cost["bops"],
        "stage_seconds": state.stage_seconds(),
    }


def _cached_prefixes(state, stages, keys: list[str], shared: list[int], cache: DiskCache):
    """The state after the shared stage prefixes, from the cache or computed into it; and their length.

    Starts from the longest prefix whose entry is usable; a missing, damaged
    or foreign entry of a longer one is computed and replaced.
    """
    from tinyptq.pipeline import Pipeline, PTQState

    def is_state(value: Any) -> bool:
        return isinstance(value, PTQState)

    done = 0
    prefixes = sorted(k for k in shared if 0 < k <= len(stages))
    for k in reversed(prefixes):
        snapshot = cache.load("prefix", keys[k - 1], valid=is_state)
        if snapshot is not MISSING:
            state, done = _resume(snapshot, state, stages[:k]), k
            break
    for k in (k for k in prefixes if k > done):
        start_state, first = state, done

        def compute(start_state=start_state, first=first, k=k) -> Any:
            return _snapshot(Pipeline(stages[first:k]).run(start_state))

        snapshot = cache.get_or_compute("prefix", keys[k - 1], compute, valid=is_state)
        state, done = _resume(snapshot, state, stages[:k]), k
    return state, done


def _snapshot(state):
    """A state fit for the disk: own graph copy, no calibration array, no cache handle."""
    return state.evolve(copy_graph=True, calib=None, cache=None)


def _resume(snapshot, current, stages):
    """The state cached after ``stages``, with this run's calibration data and cache.

    When a stage of the prefix uses the quantization settings, the prefix key
    covers this run's settings and the cached config is the one those stages
    left (e.g. per-layer bit-widths a mixed-precision stage wrote): it is kept.
    Otherwise the snapshot may come from a run at other bit-widths and this
    run's own config applies.
    """
    config = snapshot.config if uses_quant_config(stages) else current.config
    return snapshot.evolve(copy_graph=True, config=config, calib=current.calib, cache=current.cache)

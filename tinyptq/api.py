"""The Python API behind the CLI: evaluate a use case, quantize it with a pipeline."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tinyptq import __version__
from tinyptq.cost import CostModel
from tinyptq.errors import ConfigError
from tinyptq.metrics import MetricResult
from tinyptq.params import CALIB_SAMPLES, SEED, validate
from tinyptq.pipeline import Pipeline, PTQState, order_problem
from tinyptq.pipeline_file import PipelineSpec
from tinyptq.sim import QuantSim, target_predictor

BUILTIN_PIPELINES = Path(__file__).parent / "pipelines"


def load_pipeline(pipeline: str | Path | PipelineSpec | dict) -> PipelineSpec:
    """A pipeline from a spec, a dict, a YAML path or a built-in name (e.g. 'minmax')."""
    if isinstance(pipeline, PipelineSpec):
        return pipeline
    if isinstance(pipeline, dict):
        return PipelineSpec.from_dict(pipeline)
    path = Path(pipeline)
    if not path.exists() and (BUILTIN_PIPELINES / f"{pipeline}.yaml").is_file():
        path = BUILTIN_PIPELINES / f"{pipeline}.yaml"
    if not path.exists():
        names = ", ".join(sorted(p.stem for p in BUILTIN_PIPELINES.glob("*.yaml")))
        raise ConfigError(f"pipeline '{pipeline}' is neither a file nor a built-in pipeline ({names})")
    return PipelineSpec.from_yaml(path)


def load_calibration(source: str | Path | np.ndarray) -> np.ndarray:
    """Calibration inputs from an array or a .npy file, checked for NaN/Inf."""
    from tinyptq.datasets.base import check_finite
    from tinyptq.errors import DataError, first_line

    what = "calibration data"
    if not isinstance(source, np.ndarray):
        path = Path(source)
        what = f"calibration data {path}"
        try:
            source = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"cannot read {what}: {first_line(exc, 120)}") from None
        if not isinstance(source, np.ndarray):  # an .npz archive holds several arrays
            names = ", ".join(getattr(source, "files", [])[:5])
            getattr(source, "close", lambda: None)()
            raise DataError(f"{what} is an .npz archive ({names}); save the one input array with numpy.save (.npy)")
    if source.dtype.kind not in "biuf":
        raise DataError(f"{what} holds {source.dtype} values; calibration inputs must be numbers")
    if source.ndim < 2 or len(source) == 0:
        raise DataError(f"{what} must be a non-empty (N, ...) array, got shape {source.shape}")
    return check_finite(np.asarray(source, np.float32), what)


@dataclass
class QuantizeResult:
    """The final PTQ state, its simulation and the summary written to summary.json."""

    state: PTQState
    sim: QuantSim
    summary: dict[str, Any]


def evaluate(use_case: str, data_dir: str | Path | None = None, model: str | Path | None = None) -> MetricResult:
    """The FP32 metric of a use case's model."""
    from tinyptq.models.usecases import get_use_case

    uc = get_use_case(use_case, data_dir)
    return _fp32_baseline(uc, uc.load_graph(model), model)[2]


def evaluate_deployed(
    use_case: str, model: str | Path, runtime: str = "tflm", data_dir: str | Path | None = None, progress: bool = False
) -> MetricResult:
    """The metric of a deployed .tflite file run by ``runtime`` (see tinyptq.runtimes) on the use case's data.

    Label-free metrics compare with the use case's own FP32 model.
    """
    from tinyptq import runtimes
    from tinyptq.models.usecases import get_use_case

    if runtime not in runtimes.RUNTIMES:
        raise ConfigError(f"unknown runtime '{runtime}' (valid: {', '.join(runtimes.RUNTIMES)})")
    uc = get_use_case(use_case, data_dir)
    data = uc.eval_set()
    scores = runtimes.run(model, data.x, runtime, progress=progress)
    reference = scores if data.y is not None else uc.load_graph().predict(data.x)
    return uc.metric(data, scores, reference)


def _fp32_baseline(uc, graph, model: str | Path | None, where: Mapping[str, str] | None = None):
    """The evaluation set (restricted by ``where``), the FP32 scores on it and the FP32 metric."""
    from tinyptq.errors import ModelError

    data = uc.eval_set(where=where) if where else uc.eval_set()
    graph.check_input(data.x, f"{uc.name} evaluation data")
    scores = graph.predict(data.x)
    try:
        return data, scores, uc.metric(data, scores, scores)
    except ModelError as exc:  # the output does not fit the use case's metric: name the model
        raise ModelError(f"model {model or uc.model_path()} does not fit use case '{uc.name}': {exc}") from None


@dataclass
class Prepared:
    """What a pipeline run starts from: the pipeline, the use case, its model, calibration and evaluation data."""

    spec: PipelineSpec
    config: Any  # QuantConfig
    stages: Pipeline
    uc: Any  # UseCase
    graph: Any  # ModelGraph
    model: str | Path | None
    calib: np.ndarray
    calib_seed: int
    calib_where: dict[str, str] | None
    data: Any  # EvalSet
    fp32_scores: np.ndarray
    fp32: MetricResult

    def state(self, **changes: Any) -> PTQState:
        """The pipeline's starting state."""
        return PTQState(graph=self.graph, config=self.config, calib=self.calib, seed=self.calib_seed, **changes)


def prepare(
    use_case: str,
    pipeline: str | Path | PipelineSpec | dict = "minmax",
    data_dir: str | Path | None = None,
    model: str | Path | None = None,
    weight_bits: int | None = None,
    act_bits: int | None = None,
    calib_samples: int | None = None,
    seed: int | None = None,
    calib_data: str | Path | np.ndarray | None = None,
    target: str | None = None,
    calib_filter: Mapping[str, str] | str | None = None,
    eval_filter: Mapping[str, str] | str | None = None,
) -> Prepared:
    """Everything checked and loaded before a pipeline runs (arguments as for :func:`quantize`)."""
    from tinyptq.models.usecases import get_use_case

    spec = load_pipeline(pipeline)
    config = spec.quant_config(weight_bits, act_bits)
    if target is not None:
        config = config.replace(target=target)
    stages = Pipeline.from_spec(spec)
    # the pipeline's calibration values were validated when it was read; these are the caller's
    if calib_samples is not None:
        calib_samples = validate("quantize", "calib_samples", calib_samples, CALIB_SAMPLES)
    if seed is not None:
        seed = validate("quantize", "seed", seed, SEED)
    calib_seed = seed if seed is not None else spec.calibration.get("seed", 0)
    uc = get_use_case(use_case, data_dir)
    calib_where = uc.check_filter(calib_filter, "calibration filter")
    eval_where = uc.check_filter(eval_filter, "evaluation filter")
    if calib_where and calib_data is not None:
        raise ConfigError("a calibration filter selects the use case's own samples; it cannot apply to given calib_data")
    graph = uc.load_graph(model)
    # the whole order, with the rules grids use, before any stage runs
    problem = order_problem([s.name for s in stages.stages], batch_norms=bool(graph.batch_norm_names()))
    if problem is not None:
        raise ConfigError(f"pipeline '{spec.name}' cannot run: {problem}")
    n = calib_samples if calib_samples is not None else spec.calibration.get("samples", uc.calibration_size)
    if calib_data is not None:
        calib = load_calibration(calib_data)
        calib = calib[:calib_samples] if calib_samples is not None else calib
    elif calib_where:
        calib = uc.calibration_data(n, calib_seed, where=calib_where)
    else:
        calib = uc.calibration_data(n, calib_seed)
    graph.check_input(calib, f"{uc.name} calibration data")
    data, fp32_scores, fp32 = _fp32_baseline(uc, graph, model, eval_where)
    return Prepared(spec, config, stages, uc, graph, model, calib, calib_seed, calib_where, data, fp32_scores, fp32)


def quantize(
    use_case: str,
    pipeline: str | Path | PipelineSpec | dict = "minmax",
    data_dir: str | Path | None = None,
    model: str | Path | None = None,
    weight_bits: int | None = None,
    act_bits: int | None = None,
    calib_samples: int | None = None,
    seed: int | None = None,
    on_stage=None,
    calib_data: str | Path | np.ndarray | None = None,
    target: str | None = None,
    calib_filter: Mapping[str, str] | str | None = None,
    eval_filter: Mapping[str, str] | str | None = None,
) -> QuantizeResult:
    """Run a PTQ pipeline on a use case; return the state, sim and summary.

    ``target`` (qdq, tflite, onnxruntime) overrides the pipeline's: the arithmetic the quantized metric is computed with.
    ``calib_filter`` / ``eval_filter`` (a mapping or ``key=value,...`` text, e.g. ``speaker=jackson``)
    restrict the use case's calibration / evaluation samples (see ``UseCase.filter_keys``).
    """
    start = time.perf_counter()
    run = prepare(
        use_case, pipeline, data_dir, model, weight_bits, act_bits, calib_samples, seed, calib_data, target,
        calib_filter, eval_filter,
    )
    spec, config, stages, uc, graph, calib = run.spec, run.config, run.stages, run.uc, run.graph, run.calib
    calib_seed, calib_where, data, fp32_scores, fp32 = run.calib_seed, run.calib_where, run.data, run.fp32_scores, run.fp32
    fp32_bytes = graph.param_count() * 4

    state = stages.run(run.state(), on_stage=on_stage)
    sim = QuantSim(state)
    predict = sim.predict if config.target == "qdq" else target_predictor(state)
    quant = uc.metric(data, predict(data.x), fp32_scores)
    cost = CostModel(state.graph).for_state(state)
    summary = {
        "tinyptq_version": __version__,
        "use_case": uc.name,
        "model": str(model or uc.model_path()),
        "metric": quant.name,
        "metric_unit": quant.unit,
        "fp32_metric": fp32.name,
        "fp32_unit": fp32.unit,
        "eval_samples": fp32.samples,
        "eval_source": data.source,
        "fp32": fp32.value,
        "quantized": quant.value,
        # a difference only where both numbers measure the same thing
        "delta": quant.value - fp32.value if quant.name == fp32.name else None,
        "metric_extras": dict(quant.extras),
        "bits": {"weights": config.weight_bits, "activations": config.act_bits},
        "quant_config": config.to_dict(),
        # the filter only when one was given: unfiltered summaries keep their shape
        "calibration": {"samples": len(calib), "seed": calib_seed, **({"filter": calib_where} if calib_where else {})},
        "pipeline": {
            "name": spec.name,
            "stages": [{s.name: _jsonable(s.get_params())} for s in stages.stages],
        },
        "stage_seconds": state.stage_seconds(),
        "stage_log": [{"stage": r.stage, "seconds": round(r.seconds, 4), "lines": r.lines} for r in state.log],
        "weight_bytes": cost.weight_bytes,
        "fp32_weight_bytes": fp32_bytes,
        # the cost model's totals and per-layer rows (tinyptq.cost)
        "cost": cost.to_dict(),
        "seconds_total": round(time.perf_counter() - start, 3),
    }
    return QuantizeResult(state, sim, summary)


def write_summary(out_dir: str | Path, summary: dict[str, Any]) -> Path:
    """Write summary.json atomically into ``out_dir`` (ConfigError in one line when it cannot)."""
    from tinyptq.paths import write_error

    out = Path(out_dir)
    path = out / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(summary, indent=2, default=_jsonable))
        tmp.replace(path)
    except OSError as exc:
        raise write_error(path, exc) from None
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj



# ``analyze(use_case, pipeline, ...)``: which layer hurts the quantized model, and the fix (tinyptq.analysis)
from tinyptq.analysis.run import analyze  # noqa: E402,F401

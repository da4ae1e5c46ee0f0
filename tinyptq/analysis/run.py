"""``analyze``: run a pipeline, keep its state after every stage, and explain the quantized model's loss."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from tinyptq import __version__
from tinyptq.analysis import FIX_BITS, SAMPLES, SELECT_BY, SHARE
from tinyptq.analysis.fix import FixSearch, fix_cost, override_yaml
from tinyptq.analysis.layers import loss_split, unit_table
from tinyptq.analysis.probe import Probe
from tinyptq.analysis.stages import stage_table
from tinyptq.analysis.tensors import activation_stats, histograms, kernel_stats
from tinyptq.cost import CostModel
from tinyptq.errors import ConfigError
from tinyptq.params import validate
from tinyptq.pipeline import MemoryCache, Pipeline, PTQState, Stage
from tinyptq.sim import QuantSim, target_predictor


def analyze(
    use_case: str,
    pipeline: Any = "minmax",
    data_dir: str | Path | None = None,
    model: str | Path | None = None,
    weight_bits: int | None = None,
    act_bits: int | None = None,
    calib_samples: int | None = None,
    seed: int | None = None,
    calib_data: Any = None,
    calib_filter: Mapping[str, str] | str | None = None,
    eval_filter: Mapping[str, str] | str | None = None,
    share: float = 0.8,
    fix_bits: str = "8",
    select_by: str = "noise",
    apply: bool = False,
    samples: int = 128,
    progress: bool = True,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """The analysis of a pipeline's quantized model (see tinyptq.analysis); written into ``out`` when given.

    ``share``: the part of the loss the suggested fix must recover; ``fix_bits``:
    "8" or "next" (the next candidate bit-width); ``select_by``: "noise"
    (label-free, calibration samples) or "metric" (evaluation set);
    ``apply``: rerun the pipeline with the fix and report the metric;
    ``samples``: calibration samples used for the label-free measures.
    """
    from tinyptq import api

    share = validate("analyze", "share", share, SHARE)
    fix_bits = validate("analyze", "fix_bits", str(fix_bits), FIX_BITS)
    select_by = validate("analyze", "select_by", select_by, SELECT_BY)
    samples = validate("analyze", "samples", samples, SAMPLES)
    if out is not None:
        from tinyptq.paths import check_out_dir

        check_out_dir(out, "--out")
    start = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(key: str, since: float) -> float:
        now = time.perf_counter()
        seconds[key] = round(now - since, 2)
        return now

    run = api.prepare(use_case, pipeline, data_dir, model, weight_bits, act_bits, calib_samples, seed, calib_data,
                      None, calib_filter, eval_filter)
    # stages, reference ranges and the applied rerun share statistics (e.g. activation histograms per graph)
    snapshots: list[tuple[str, PTQState]] = [("as loaded", run.state(cache=MemoryCache()))]
    bar = tqdm(total=len(run.stages.stages), desc="pipeline", unit="stage", disable=not progress, leave=False,
               file=sys.stderr)
    state = run.stages.run(
        snapshots[0][1], on_stage=lambda s, i, n: bar.set_postfix_str(s.name),
        on_state=lambda s, st: (snapshots.append((s.name, st)), bar.update(1)),
    )
    bar.close()
    t = lap("pipeline", start)
    x = np.asarray(run.calib[:samples], np.float32)
    # the model as the last stage before quantization left it: what "float" means for each layer
    float_graph = [st for _, st in snapshots if not st.weight_encodings and not st.act_encodings][-1].graph
    probe = Probe(state, run.uc, run.data, run.fp32_scores, x, float_graph)
    quantized_metric = _quantized_metric(run)
    comparable = quantized_metric.name == run.fp32.name
    # the FP32 row in the quantized metric's terms (e.g. an SQNR against FP32 has no FP32 value)
    split = loss_split(probe, run.fp32.value if comparable else None)
    t = lap("split", t)
    costs = {r.name: r for r in CostModel(state.graph).for_state(state).layers}
    unit_rows = unit_table(probe, costs, progress)
    t = lap("units", t)
    acts, floats = activation_stats(probe, x[: min(len(x), 128)])
    kernels = kernel_stats(probe)
    hists = histograms(probe, acts, kernels, floats)
    del floats
    t = lap("tensors", t)
    stages = stage_table(snapshots, _reference_ranges(run.stages.stages), x[: min(len(x), 128)], progress, probe.sim)
    probe.reset()
    t = lap("stages", t)
    fix = FixSearch(probe, run.fp32.value, comparable, select_by, fix_bits).run(share, progress)
    extra = fix.pop("_overrides")
    fix["yaml"] = override_yaml(run.config.overrides, extra) if extra else ""
    fix["cost"] = fix_cost(state.graph, state.config, extra)
    t = lap("fix", t)
    if apply and extra:
        before = split[-1]["metric"] if run.config.target == "qdq" else None
        fix["applied"] = _apply(run, snapshots, extra, before, probe.sim)
        t = lap("apply", t)
    seconds["total"] = round(time.perf_counter() - start, 2)
    analysis = {
        "tinyptq_version": __version__,
        "use_case": run.uc.name,
        "model": str(run.model or run.uc.model_path()),
        "pipeline": run.spec.name,
        "bits": {"weights": run.config.weight_bits, "activations": run.config.act_bits},
        "target": run.config.target,
        "metric": {"name": quantized_metric.name, "unit": quantized_metric.unit, "comparable": comparable,
                   "fp32_name": run.fp32.name, "fp32_unit": run.fp32.unit, "fp32": run.fp32.value},
        "eval_samples": int(len(run.data.x)),
        "calib_samples": int(len(x)),
        "seconds": seconds,
        "stage_seconds": state.stage_seconds(),  # the pipeline's own stages
        "split": split,
        "units": unit_rows,
        "tensors": {"activations": acts, "kernels": kernels},
        "histograms": hists,
        "stages": stages,
        "fix": fix,
        "notes": _notes(run, state, quantized_metric) + _fix_notes(fix),
    }
    if out is not None:
        from tinyptq.analysis.render import write_reports

        write_reports(analysis, out)
    return analysis


def _quantized_metric(run: Any) -> Any:
    """The use case's metric of quantized scores (its name and unit; the value is FP32's own)."""
    return run.uc.metric(run.data, run.fp32_scores * 1.0, run.fp32_scores)


def _reference_ranges(stages: list[Stage]) -> Stage:
    """The pipeline's range setting (to quantize the snapshots from before it)."""
    from tinyptq.components.range_setting import RangeSetting

    found = [s for s in stages if s.name == "range_setting"]
    if not found:
        raise ConfigError("the pipeline has no range_setting stage: nothing would be quantized")
    return RangeSetting(**found[0].get_params())


def _apply(
    run: Any, snapshots: list[tuple[str, PTQState]], extra: list, before: float | None = None, sim: Any = None
) -> dict[str, Any]:
    """The pipeline rerun with the fix's overrides: the metric before and after (in the pipeline's target).

    The stages whose result does not depend on the quantization config (BN
    folding, CLE) are not run again: the rerun starts from their snapshot.
    ``sim`` (the analysis's, left holding the rerun's state) spares a rebuild.
    """
    start = time.perf_counter()
    stages = run.stages.stages
    first = next((i for i, s in enumerate(stages) if s.uses_quant_config), len(stages))
    config = run.config.replace(overrides=(*run.config.overrides, *extra))
    fixed = Pipeline(stages[first:]).run(snapshots[first][1].evolve(config=config))

    def metric(s: PTQState) -> float:
        if s.config.target != "qdq":
            predict = target_predictor(s)
        elif sim is not None and tuple(s.graph.node_names()) == tuple(sim.executor.order):
            sim.load(s)  # the analysis's simulation, reloaded: no rebuild
            predict = sim.predict
        else:
            predict = QuantSim(s).predict
        return round(float(run.uc.metric(run.data, predict(run.data.x), run.fp32_scores).value), 4)

    before = metric(snapshots[-1][1]) if before is None else before
    return {"metric_before": before, "metric_after": metric(fixed),
            "seconds": round(time.perf_counter() - start, 2)}


def _fix_notes(fix: dict[str, Any]) -> list[str]:
    if fix["selected"] and not fix.get("reached", True):
        return [f"the fix recovers {fix['recovered']:.0%} of the {fix['select_by']} loss, short of the "
                f"{fix['share']:.0%} asked: no further unit lowered the loss"]
    return []


def _notes(run: Any, state: PTQState, quantized: Any) -> list[str]:
    notes = []
    if run.config.target != "qdq":
        notes.append(f"the pipeline's target is {run.config.target}: this analysis runs the QDQ simulation; "
                     "the applied metric uses the target's arithmetic")
    if any(s.name == "mixed_precision" for s in run.stages.stages):
        notes.append("the pipeline chooses bit-widths with mixed_precision, whose overrides come after the "
                     "pipeline's own: a pasted override block is overruled where the allocation sets bits")
    if quantized.name != run.fp32.name:
        notes.append(f"the quantized models are measured by {quantized.name}, the FP32 model by {run.fp32.name} "
                     f"({run.fp32.value:.4g} {run.fp32.unit}): there is no loss in one metric, the fix uses output noise")
    if state.fixed_weights:
        notes.append("raised layers lose the rounding stage's choices in the simulation (nearest at the new bits); "
                     "the applied run rounds them again")
    return notes

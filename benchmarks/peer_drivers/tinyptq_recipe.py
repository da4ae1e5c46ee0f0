"""tinyptq's recipes, run through its public API on the shared model and calibration samples.

Methods:

- ``minmax``, ``gptq``, ``adaround``, ``adaround_a4``, ``brecq_qdrop``: the built-in pipelines
  of those names (``tinyptq/pipelines/*.yaml``) at the job's bits, with every
  layer and the model input at those bits;
- ``mixed``: BN folding, CLE, mixed precision under a weight-memory budget equal
  to the uniform ``weight_bits`` model's weight memory (candidates 2, 4 and
  8 bits, activations at ``act_bits``), MSE ranges, AdaRound, bias correction.

The model is the shared ``model.h5`` and the calibration samples the shared
``calib.npy``. Scores are the fake-quantized simulation's (``QuantSim``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _job import Job, main  # noqa: E402

BUILT_IN = ("minmax", "gptq", "adaround", "adaround_a4", "brecq_qdrop")


def mixed_recipe(job: Job, weight_kb: float) -> dict:
    """The ``mixed`` pipeline as a dict, with its budget."""
    mp = {"weight_kb": weight_kb, "weight_candidates": [2, 4, 8], "act_candidates": [job.act_bits]}
    return {
        "name": "mixed",
        "quant": {"weight_per_channel": True, "weight_symmetric": True, "act_symmetric": False},
        "calibration": {"samples": 512, "seed": job.seed},
        "stages": [
            "bn_folding",
            "cle",
            {"mixed_precision": mp},
            {"range_setting": {"weights": "mse", "activations": "mse"}},
            "adaround",
            {"bias_correction": {"method": "empirical"}},
        ],
    }


def uniform_weight_kb(job: Job, calib) -> float:
    """Weight memory (KiB) of the BN-folded model with every kernel at ``weight_bits``."""
    from tinyptq.config import QuantConfig
    from tinyptq.cost import CostModel
    from tinyptq.graph.loading import load_graph
    from tinyptq.pipeline import Pipeline, PTQState, create_stage

    config = QuantConfig(weight_bits=job.weight_bits, act_bits=job.act_bits, weight_per_channel=True)
    folded = Pipeline([create_stage("bn_folding", {})]).run(PTQState(load_graph(job.model_h5), config, calib))
    return CostModel(folded.graph).for_config(config).weight_bytes / 1024


def run(job: Job) -> None:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    from tinyptq import api

    calib = job.calibration()
    if job.method in BUILT_IN:
        pipeline: str | dict = job.method
    elif job.method == "mixed":
        pipeline = mixed_recipe(job, uniform_weight_kb(job, calib))
    else:
        raise SystemExit(f"unknown method {job.method!r}; valid: {', '.join((*BUILT_IN, 'mixed'))}")
    result = api.quantize(
        job.spec["use_case"],
        pipeline,
        model=job.model_h5,
        weight_bits=job.weight_bits,
        act_bits=job.act_bits,
        calib_data=calib,
        seed=job.seed,
    )
    summary = result.summary
    job.spec["_seconds"] = sum(summary["stage_seconds"].values())
    bits = {ov.pattern: ov.weight_bits for ov in result.state.config.overrides if ov.weight_bits is not None}
    job.finish(
        result.sim.predict(job.eval_inputs()),
        config={
            "pipeline": summary["pipeline"],
            "calibration_samples": len(calib),
            "weight_bytes": summary["weight_bytes"],
            **({"weight_bits_per_layer": bits} if job.method == "mixed" else {}),
        },
        notes=["quantize_seconds is the sum of the pipeline's stage times"],
    )


if __name__ == "__main__":
    main(run)

"""AIMET-ONNX (``aimet-onnx`` 2.42) on the shared float ONNX model: QuantizationSimModel.

Methods (the job's ``method``):

- ``minmax``: quantization scheme ``min_max`` (AIMET's post-training TF scheme);
- ``sqnr``: scheme ``tf_enhanced`` (AIMET's SQNR-based range search);
- ``adaround``: AIMET's BN folding, then ``apply_adaround`` of the weights (their
  encodings computed with ``tf_enhanced``) with ``options.iterations`` (2000)
  steps per layer, then activation encodings computed on the AdaRounded-weight
  model with ``options.act_scheme`` (``tf_enhanced``).

Every sim uses AIMET's per-channel config ``default_config_per_channel.json``
(alias ``"default"``): Conv/Gemm/MatMul weights per output channel and
symmetric, activations and the model input per tensor and asymmetric, biases
not quantized. Weights get ``int(weight_bits)``, activations and the input
``int(act_bits)``. AIMET's supergroups (Conv+Relu, Add+Relu, MatMul+Add) leave
no quantizer inside a group. Encodings are computed on all calibration samples
(batches of 32); AdaRound caches and samples from the same batches. Scores
are the simulation's (``sim.session``, onnxruntime on the CPU with AIMET's
QcQuantizeOp custom op). torch runs on ``options.torch_threads`` (1) threads.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _job import Job, batched, main  # noqa: E402

# This file is named like the package it drives: keep its folder off the path so
# that ``import aimet_onnx`` finds AIMET, not this script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

SCHEMES = {"minmax": "min_max", "sqnr": "tf_enhanced", "adaround": "tf_enhanced"}
CONFIG = "default"  # aimet_onnx/common/quantsim_config/default_config_per_channel.json
BATCH = 32


def run(job: Job) -> None:
    if job.method not in SCHEMES:
        raise SystemExit(f"unknown method {job.method!r}; valid: {', '.join(SCHEMES)}")
    import aimet_onnx
    import onnx
    import torch
    from aimet_onnx import QuantizationSimModel, qtype
    from aimet_onnx.batch_norm_fold import fold_all_batch_norms_to_weight
    from aimet_onnx.common.defs import QuantScheme

    np.random.seed(job.seed)
    torch.manual_seed(job.seed)
    # AdaRound's optimisation runs in torch; on a small shared CPU its default
    # thread pool oversubscribes the cores (measured: one step ~13x slower).
    threads = int(job.options.get("torch_threads", 1))
    torch.set_num_threads(threads)
    model = onnx.load(job.model_onnx)
    input_name, output = model.graph.input[0].name, model.graph.output[0].name
    calib = job.calibration()
    batches = [{input_name: calib[i : i + BATCH]} for i in range(0, len(calib), BATCH)]
    iterations = int(job.options.get("iterations", 2000))
    act_scheme = job.options.get("act_scheme", "tf_enhanced") if job.method == "adaround" else SCHEMES[job.method]
    notes: list[str] = ["quantize_seconds include building the QuantizationSimModel (inserting quantizers)"]

    job.start()
    if job.method == "adaround":
        conv_bn, bn_conv = fold_all_batch_norms_to_weight(model)
        folded = len(conv_bn) + len(bn_conv)
        notes.append(f"fold_all_batch_norms_to_weight folded {folded} BN pairs (tf2onnx had folded BN into Conv)")
    sim = QuantizationSimModel(
        model,
        param_type=qtype.int(job.weight_bits),
        activation_type=qtype.int(job.act_bits),
        quant_scheme=SCHEMES[job.method],
        config_file=CONFIG,
    )
    if job.method == "adaround":
        adaround_started = time.perf_counter()
        aimet_onnx.apply_adaround(sim, batches, num_iterations=iterations)  # weight encodings: sim's scheme
        adaround_seconds = time.perf_counter() - adaround_started
        # AdaRound leaves activation quantizers uncalibrated (pass-through): layer inputs
        # carry the upstream AdaRounded weights but float activations.
        if act_scheme != SCHEMES[job.method]:  # activation ranges in another scheme than the weights'
            for name in sim.activation_names:
                sim.qc_quantize_op_dict[name].set_quant_scheme(QuantScheme.from_str(act_scheme))
    sim.compute_encodings(batches)
    job.stop()

    quantizers = sim.qc_quantize_op_dict
    params = [quantizers[n] for n in sim.param_names if quantizers[n].enabled]
    acts = [quantizers[n] for n in sim.activation_names if quantizers[n].enabled]
    if input_name in quantizers and quantizers[input_name].enabled:
        enc = quantizers[input_name].get_encodings()[0]
        notes.append(
            f"model input quantized at {enc.bw} bits, per tensor, range [{enc.min:.4g}, {enc.max:.4g}] "
            f"from the calibration samples"
        )
    else:
        notes.append("model input NOT quantized")
    output_quantized = output in quantizers and quantizers[output].enabled
    notes.append(f"{len(params)} weight and {len(acts)} activation quantizers; model output quantized: {output_quantized}")

    scores = batched(lambda x: sim.session.run(None, {input_name: x})[0], job.eval_inputs())
    config = {
        "aimet_onnx": aimet_onnx.__version__,
        "config_file": "default_config_per_channel.json (alias 'default')",
        "param_type": f"int{job.weight_bits}",
        "activation_type": f"int{job.act_bits}",
        "quant_scheme": SCHEMES[job.method],
        "weights_per_channel": all(q.quant_info.usePerChannelMode for q in params),
        "weights_symmetric": all(q.use_symmetric_encodings for q in params),
        "activations_symmetric": any(q.use_symmetric_encodings for q in acts),
        "calibration_samples": len(calib),
        "calibration_batch": BATCH,
        "torch_threads": threads,
    }
    if job.method == "adaround":
        config |= {
            "bn_pairs_folded": folded,
            "adaround_iterations_per_layer": iterations,
            "adaround_layers": sum(q.is_encoding_frozen() for q in params),
            "adaround_seconds": round(adaround_seconds, 1),
            "adaround_samples": f"all {len(calib)} ({len(batches)} batches of {BATCH}; one batch per step)",
            "adaround_param_scheme": SCHEMES[job.method],
            "activation_scheme": act_scheme,
        }
    job.finish(scores, notes=notes, config=config)


if __name__ == "__main__":
    main(run)

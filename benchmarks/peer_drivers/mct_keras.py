"""Peer driver: Sony's Model Compression Toolkit (MCT 2.6.1) on the Keras model.

Run in MCT's own venv (model-compression-toolkit==2.6.1, tensorflow 2.15; MCT
refuses TF >= 2.16):  ``python mct_keras.py job.json``.

The TPC (target platform capabilities) is built here rather than taken from
MCT's IMX500 default, so that every setting follows the benchmark convention:

- kernels of Conv2D / DepthwiseConv2D / Dense: symmetric, per-channel, at
  ``weight_bits`` (mixed: candidates 8/4/2 and ``weight_bits``); biases stay float (as in MCT's
  own TPCs);
- every activation, *including the model input* (the InputLayer node gets the
  TPC's default op config), per-tensor at ``act_bits``, ``UNIFORM`` method
  (min/max range with zero point, chosen by MCT's MSE error search);
- conv/dense -> ReLU and add -> ReLU are fused (one quantizer after the ReLU),
  Dropout/Flatten/Reshape are not requantized, as in MCT's default TPC.

Methods: ``ptq`` (keras_post_training_quantization, default CoreConfig),
``gptq`` (keras_gradient_post_training_quantization, GPTQ defaults except
Sample-Layer Attention, whose per-sample Hessians take ~20 min on ic here;
``options.epochs`` epochs, ``options.sla`` to turn SLA back on), ``mixed``
(PTQ under ``ResourceUtilization(weights_memory=options.weight_bytes)``,
kernel candidates 8/4/2 bits, activations at ``act_bits``).
"""

from __future__ import annotations

import json
import random
import sys
from functools import partial
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import model_compression_toolkit as mct  # noqa: E402
import tensorflow as tf  # noqa: E402
from _job import Job, batched, main  # noqa: E402
from mct_quantizers import KerasActivationQuantizationHolder, KerasQuantizationWrapper  # noqa: E402
from model_compression_toolkit.target_platform_capabilities.constants import (  # noqa: E402
    BIAS_ATTR,
    KERNEL_ATTR,
    WEIGHTS_N_BITS,
)

tpc_s = mct.target_platform_capabilities
Names = tpc_s.OperatorSetNames
ACT_METHOD = tpc_s.QuantizationMethod.UNIFORM
BATCH = 32  # representative-dataset batch size (512 samples -> 16 batches)
# ic: ~3.4 s/epoch (16 steps of 32) + ~95 s of PTQ and Hessians on 2 busy cores: ~3 min in all
GPTQ_EPOCHS = 25


def load_keras(path: str) -> tf.keras.Model:
    """Load the tf_keras 2.21 .h5 in TF 2.15: rebuild from its config, then load weights.

    TF 2.15's InputLayer rejects the ``optional`` key Keras 2.21 writes, so
    ``load_model`` fails; the config without that key plus ``load_weights`` is
    the same model (outputs identical to the float reference).
    """
    with h5py.File(path, "r") as f:
        config = json.loads(f.attrs["model_config"])
    for layer in config["config"]["layers"]:
        layer["config"].pop("optional", None)
    model = tf.keras.models.model_from_json(json.dumps(config))
    model.load_weights(path)
    return model


def build_tpc(
    weight_bits: int, act_bits: int, candidates: list[int]
) -> tpc_s.TargetPlatformCapabilities:
    """A TPC with every activation at ``act_bits`` and kernels at ``candidates`` bits."""
    off = tpc_s.AttributeQuantizationConfig()  # not quantized (float)
    kernel = tpc_s.AttributeQuantizationConfig(
        weights_quantization_method=tpc_s.QuantizationMethod.SYMMETRIC,
        weights_n_bits=weight_bits,
        weights_per_channel_threshold=True,
        enable_weights_quantization=True,
    )
    op_config = partial(
        tpc_s.OpQuantizationConfig,
        default_weight_attr_config=off,
        activation_n_bits=act_bits,
        activation_quantization_method=ACT_METHOD,
        supported_input_activation_n_bits=act_bits,
        enable_activation_quantization=True,
        quantization_preserving=False,
        signedness=tpc_s.Signedness.AUTO,
    )
    linear = op_config(attr_weights_configs_mapping={KERNEL_ATTR: kernel, BIAS_ATTR: off})
    options = [
        linear.clone_and_edit(attr_to_edit={KERNEL_ATTR: {WEIGHTS_N_BITS: b}}) for b in candidates
    ]
    base = options[candidates.index(weight_bits)]
    linear_qco = tpc_s.QuantizationConfigOptions(
        quantization_configurations=tuple(options), base_config=base
    )
    default_qco = tpc_s.QuantizationConfigOptions(
        quantization_configurations=(op_config(attr_weights_configs_mapping={}),)
    )
    passthrough = default_qco.clone_and_edit(enable_activation_quantization=False)

    conv, dw, fc = (
        tpc_s.OperatorsSet(name=n, qc_options=linear_qco)
        for n in (Names.CONV, Names.DEPTHWISE_CONV, Names.FULLY_CONNECTED)
    )
    relu, add = tpc_s.OperatorsSet(name=Names.RELU), tpc_s.OperatorsSet(name=Names.ADD)
    keep = [
        tpc_s.OperatorsSet(name=n, qc_options=passthrough)
        for n in (Names.DROPOUT, Names.FLATTEN, Names.RESHAPE)
    ]
    convs = tpc_s.OperatorSetGroup(operators_set=[conv, dw])
    fusing = tuple(tpc_s.Fusing(operator_groups=(op, relu)) for op in (convs, fc, add))
    return tpc_s.TargetPlatformCapabilities(
        default_qco=default_qco, operator_set=(conv, dw, fc, relu, add, *keep), fusing_patterns=fusing,
        name=f"bench_w{weight_bits}a{act_bits}", add_metadata=False, is_simd_padding=False)  # fmt: skip


def describe(qmodel: tf.keras.Model) -> dict:
    """What the quantized model actually carries: per-layer weight bits and activation quantizers."""
    weights, acts = {}, {}
    for layer in qmodel.layers:
        if isinstance(layer, KerasQuantizationWrapper):
            for attr, q in layer.weights_quantizers.items():
                size = int(np.prod(getattr(layer.layer, attr).shape))
                cfg = q.get_config()
                weights[f"{layer.layer.name}/{attr}"] = dict(
                    bits=cfg["num_bits"], per_channel=cfg.get("per_channel"), size=size
                )
        elif isinstance(layer, KerasActivationQuantizationHolder):
            cfg = layer.activation_holder_quantizer.get_config()
            ranges = {
                k: np.round(cfg[k], 4).tolist() for k in ("min_range", "max_range") if k in cfg
            }
            acts[layer.name] = dict(bits=cfg["num_bits"], **ranges)
    return {"weights": weights, "activations": acts}


def run(job: Job) -> None:
    random.seed(job.seed)
    np.random.seed(job.seed)
    tf.random.set_seed(job.seed)
    if job.method not in ("ptq", "gptq", "mixed"):
        job.unsupported(f"unknown method {job.method!r}")
    model = load_keras(job.model_h5)
    calib = job.calibration()

    def representative():
        for i in range(0, len(calib), BATCH):
            yield [calib[i : i + BATCH]]

    mixed = job.method == "mixed"
    cands = sorted({8, 4, 2, job.weight_bits}, reverse=True) if mixed else [job.weight_bits]
    tpc = build_tpc(job.weight_bits, job.act_bits, cands)
    core = mct.core.CoreConfig(mixed_precision_config=mct.core.MixedPrecisionQuantizationConfig())
    config = dict(mct=mct.__version__, tf=tf.__version__, batch=BATCH, weight_candidates=cands)
    config["weights"] = "kernels symmetric per-channel, bias float"
    config["activations"] = f"{ACT_METHOD.name} per-tensor (MSE range search), input included"
    ru, notes = None, []
    if mixed:
        ru = mct.core.ResourceUtilization(weights_memory=float(job.options["weight_bytes"]))
        config["weights_memory_budget"] = job.options["weight_bytes"]

    kw = dict(core_config=core, target_platform_capabilities=tpc)
    if job.method == "gptq":
        epochs = int(job.options.get("epochs", GPTQ_EPOCHS))
        sla = bool(job.options.get("sla", False))
        gptq_cfg = mct.gptq.get_keras_gptq_config(n_epochs=epochs, use_hessian_sample_attention=sla)
        config.update(gptq_epochs=epochs, gptq_sample_layer_attention=sla)
        if not sla:
            notes.append(
                "GPTQ without MCT's default Sample-Layer Attention (its per-sample Hessians take "
                "~20 min on ic here): Hessian-weighted loss on 32 samples, other GPTQ defaults"
            )
        job.start()
        gptq = mct.gptq.keras_gradient_post_training_quantization
        qmodel, _ = gptq(model, representative, gptq_config=gptq_cfg, **kw)
    else:
        job.start()
        ptq = mct.ptq.keras_post_training_quantization
        qmodel, _ = ptq(model, representative, target_resource_utilization=ru, **kw)
    job.stop()

    layers = describe(qmodel)
    config["layers"] = layers
    config["kernel_bits"] = {k: v["bits"] for k, v in layers["weights"].items()}
    if mixed:
        used = sum(v["size"] * v["bits"] / 8 for v in layers["weights"].values())
        config["weights_memory_used"] = used
        notes.append(
            f"kernel bits chosen by MCT: {list(config['kernel_bits'].values())}; "
            f"{used:.0f} of {job.options['weight_bytes']} budget bytes"
        )
    first = qmodel.layers[1]  # the layer right after the InputLayer
    if isinstance(first, KerasActivationQuantizationHolder):
        bits = layers["activations"][first.name]["bits"]
        notes.append(f"model input quantized by MCT: {bits} bits, {ACT_METHOD.name} per-tensor")
    else:
        notes.append("model input NOT quantized by MCT")

    scores = batched(lambda b: qmodel(b, training=False).numpy(), job.eval_inputs())
    job.finish(scores, notes=notes, config=config)


if __name__ == "__main__":
    main(run)

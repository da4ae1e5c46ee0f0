"""The inputs every tool of ``benchmarks/peers.py`` shares, written once per use case.

For a use case, ``<work>/<name>/`` holds

- ``model.h5``: the float Keras model (tf_keras / Keras 2, what the Keras tools load);
- ``model.onnx``: the same model converted by tf2onnx (opset 17, NHWC input),
  what the ONNX tools load; tf2onnx folds batch norms into the convolutions, as
  any user's conversion would;
- ``calib.npy``: the calibration samples, drawn once with the seed, identical
  for every tool;
- ``eval_x.npy`` (and ``eval_y.npy`` when labelled): the evaluation inputs;
- ``fp32_scores.npy``: the float model's outputs on them (the reference of
  the label-free metric);
- ``meta.json``: where all of it came from, and the kernels' element count.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from tinyptq.graph.loading import load_keras_model
from tinyptq.models.usecases import get_use_case

LAYOUT = 2  # bump when the files written here change


def prepare(name: str, data_dir: str | None, work: Path, calib_samples: int, seed: int) -> dict:
    """Write (or reuse) the shared inputs of use case ``name``; its meta dict."""
    folder = work / name
    meta_path = folder / "meta.json"
    wanted = {"use_case": name, "calib_samples": calib_samples, "seed": seed, "layout": LAYOUT}
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if all(meta.get(k) == v for k, v in wanted.items()):
            return meta
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uc = get_use_case(name, data_dir)
    source = uc.model_path()
    model = load_keras_model(source)
    model.save(folder / "model.h5", save_format="h5")
    _to_onnx(model, folder / "model.onnx")
    calib = uc.calibration_data(calib_samples, seed)
    np.save(folder / "calib.npy", calib.astype(np.float32))
    data = uc.eval_set()
    np.save(folder / "eval_x.npy", data.x.astype(np.float32))
    if data.y is not None:
        np.save(folder / "eval_y.npy", data.y)
    graph = uc.load_graph()
    scores = graph.predict(data.x)
    np.save(folder / "fp32_scores.npy", scores.astype(np.float32))
    fp32 = uc.metric(data, scores, scores)
    meta = {
        **wanted,
        "model_source": str(source),
        "eval_samples": int(len(data.x)),
        "eval_source": data.source,
        "labelled": data.y is not None,
        "metric": fp32.name,
        "fp32": fp32.value,
        "input_shape": list(calib.shape[1:]),
        "kernel_params": kernel_params(model),
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta


def kernel_params(model) -> int:
    """Elements of the convolution and dense kernels (what a weight-memory budget counts at low bits)."""
    return int(
        sum(
            getattr(layer, attr).shape.num_elements()
            for layer in model.layers
            for attr in ("kernel", "depthwise_kernel")
            if getattr(layer, attr, None) is not None
        )
    )


def _to_onnx(model, path: Path) -> None:
    """The Keras model as float ONNX through tf2onnx (the converter a user would run)."""
    import tensorflow as tf
    import tf2onnx

    spec = [tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="input")]
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=17, output_path=str(path))

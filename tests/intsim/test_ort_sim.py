"""OrtSim against onnxruntime on the tinyptq use cases: the same outputs, value for value.

Each state (bn_folding + range_setting, per-channel weights) is exported
with tinyptq.export.qdq_onnx, the file run by onnxruntime.InferenceSession
with default options, and compared with OrtSim on the same batches. The
plan OrtSim replays must fuse the operators onnxruntime's optimized graph
fuses.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from tinyptq.config import QuantConfig  # noqa: E402
from tinyptq.export.qdq_onnx import export_qdq  # noqa: E402
from tinyptq.intsim.ort_sim import OrtSim  # noqa: E402
from tinyptq.pipeline import Pipeline, PTQState  # noqa: E402
from tinyptq.pipeline_file import PipelineSpec  # noqa: E402

N_IMAGES = 32
BATCH = 16
CONFIGS = [(8, 8), (4, 8), (4, 4)]
FUSED = ("QLinearConv", "QLinearAdd", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSoftmax", "QGemm")


def _state(graph: Any, calib: np.ndarray, weight_bits: int, act_bits: int) -> PTQState:
    spec = PipelineSpec.from_dict({"stages": ["bn_folding", "range_setting"]})
    config = QuantConfig(weight_bits=weight_bits, act_bits=act_bits, weight_per_channel=True)
    return Pipeline.from_spec(spec).run(PTQState(graph.copy(), config, np.asarray(calib, np.float32)))


@pytest.fixture(scope="module")
def states(data_dir: Path) -> Any:
    """Factory: (state, test images) of a use case at a bit width, each built once."""
    from tinyptq.models.usecases import get_use_case

    cache: dict = {}

    def make(use_case: str, weight_bits: int, act_bits: int) -> tuple[PTQState, np.ndarray]:
        if use_case not in cache:
            uc = get_use_case(use_case, data_dir)
            cache[use_case] = (uc.load_graph(), uc.calibration_data(64, 0), uc.eval_set().x[:N_IMAGES])
        graph, calib, x = cache[use_case]
        key = (use_case, weight_bits, act_bits)
        if key not in cache:
            cache[key] = _state(graph, calib, weight_bits, act_bits)
        return cache[key], np.asarray(x, np.float32)

    return make


def _session(path: Path, optimized: Path | None = None, threads: int | None = None) -> Any:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    if threads is not None:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ort_predict(session: Any, x: np.ndarray, batch: int) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i: i + batch]})[0] for i in range(0, len(x), batch)])


def _compare(state: PTQState, x: np.ndarray, path: Path, batch: int = BATCH, threads: int | None = None) -> None:
    export_qdq(state, path)
    ref = _ort_predict(_session(path, threads=threads), x, batch)
    got = OrtSim(state, threads=threads).predict(x, batch_size=batch)
    differing = int((ref != got).sum())
    assert differing == 0, f"{differing} of {ref.size} output values differ from onnxruntime"
    assert np.array_equal(ref.argmax(axis=1), got.argmax(axis=1))


@pytest.mark.parametrize("bits", CONFIGS, ids=lambda b: f"W{b[0]}A{b[1]}")
def test_ic_matches_onnxruntime(states: Any, tmp_path: Path, bits: tuple[int, int]) -> None:
    state, x = states("ic", *bits)
    _compare(state, x, tmp_path / "ic.onnx")


@pytest.mark.parametrize("bits", [(8, 8), (4, 4)], ids=lambda b: f"W{b[0]}A{b[1]}")
def test_kws_matches_onnxruntime(states: Any, tmp_path: Path, bits: tuple[int, int]) -> None:
    state, x = states("kws", *bits)
    _compare(state, x, tmp_path / "kws.onnx")


def test_one_image_batches(states: Any, tmp_path: Path) -> None:
    """A batch of one image takes other MLAS float kernels (thread-split convolutions, M=1 GEMM)."""
    state, x = states("ic", 4, 4)
    _compare(state, x[:3], tmp_path / "ic.onnx", batch=1, threads=2)


@pytest.mark.parametrize("bits", [(8, 8), (4, 4)], ids=lambda b: f"W{b[0]}A{b[1]}")
def test_plan_fuses_what_onnxruntime_fuses(states: Any, tmp_path: Path, bits: tuple[int, int]) -> None:
    state, _ = states("ic", *bits)
    path, optimized = tmp_path / "ic.onnx", tmp_path / "ic_optimized.onnx"
    export_qdq(state, path)
    _session(path, optimized)
    ort_ops = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    plan = Counter(OrtSim(state).plan())
    for op in FUSED:
        assert plan[op] == ort_ops[op], op
    assert plan["Conv"] == ort_ops["Conv"] + ort_ops["FusedConv"]  # float convolutions
    for op in ("Gemm", "Add", "Softmax", "AveragePool"):
        assert plan[op] == ort_ops[op], op
    if bits == (8, 8):  # residual branches stay int8 (two readers): their convolutions and adds stay float
        assert plan["QLinearConv"] == 3 and plan["QLinearAdd"] == 1 and plan["QLinearSoftmax"] == 1
    else:  # 4-bit grids in 8-bit types are clipped first: nothing fuses
        assert not any(plan[op] for op in FUSED)


def test_run_int_gives_the_dequantized_outputs(states: Any) -> None:
    state, x = states("ic", 8, 8)
    sim = OrtSim(state)
    (name, (q, params)), = sim.run_int(x[:BATCH]).items()
    assert q.dtype == np.uint8  # the int8 export of the softmax output, moved to uint8 by onnxruntime
    floats = (q.astype(np.float32) - np.float32(params.zero_point)) * np.float32(params.scale)
    assert np.array_equal(floats, sim.predict(x[:BATCH], batch_size=BATCH))
    assert name == state.graph.output_names[0]


# ------------------------------------------------------- hand-built QDQ models
def _conv_model(weights: Any, relu_zp: int | None, rng: np.random.Generator) -> Any:
    """float input -> Q/DQ (int8) -> Conv [-> Relu] -> Q/DQ (int8) -> output, with a float bias.

    ``weights`` is a float kernel (onnxruntime quantizes it itself) or (int8 kernel, per-channel scales).
    """
    from onnx import TensorProto, helper, numpy_helper

    f32 = np.float32
    inits = {"xs": np.asarray(0.05, f32), "xz": np.asarray(-3, np.int8), "b": rng.normal(0, 0.3, 8).astype(f32),
             "ys": np.asarray(0.04, f32), "yz": np.asarray(-128 if relu_zp is None else relu_zp, np.int8)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xf"])]
    if isinstance(weights, tuple):
        inits.update(wq=weights[0], ws=weights[1], wz=np.zeros(8, np.int8))
        nodes.append(helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0))
    else:
        inits["w"] = weights
    nodes.append(helper.make_node("Conv", ["xf", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("Relu", ["c"], ["r"]))
    nodes += [helper.make_node("QuantizeLinear", ["r", "ys", "yz"], ["yq"]),
              helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, n) for n, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


@pytest.mark.parametrize("case", ["float_weights", "relu_zero_point_above_minimum"])
def test_runner_on_hand_built_models(tmp_path: Path, case: str) -> None:
    """onnxruntime quantizes float weights itself; a ReLU its QuantizeLinear does not make redundant stays float."""
    from tinyptq.intsim.ort_sim import OrtRunner

    rng = np.random.default_rng(0)
    if case == "float_weights":
        model, fused = _conv_model(rng.normal(0, 0.2, (8, 4, 3, 3)).astype(np.float32), None, rng), True
    else:
        w = (rng.integers(-127, 128, (8, 4, 3, 3)).astype(np.int8), rng.uniform(0.002, 0.01, 8).astype(np.float32))
        model, fused = _conv_model(w, -100, rng), False
    path, optimized = tmp_path / "model.onnx", tmp_path / "optimized.onnx"
    onnx.save(model, str(path))
    session = _session(path, optimized)
    x = rng.normal(0, 2, (16, 4, 6, 6)).astype(np.float32)
    runner = OrtRunner(model)
    ort_ops = {n.op_type for n in onnx.load(str(optimized)).graph.node}
    assert ("QLinearConv" in ort_ops) == fused == ("QLinearConv" in runner.plan())
    assert np.array_equal(session.run(None, {"x": x})[0], runner.run(x)["y"])

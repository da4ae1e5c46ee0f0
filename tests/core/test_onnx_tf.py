"""TF implementations of the non-layer ONNX nodes against onnxruntime, one node at a time."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tinyptq._tf import tf
from tinyptq.errors import ModelError
from tinyptq.graph.onnx_tf import node_function
from tinyptq.graph.onnx_topology import OnnxNode

X4 = (2, 3, 7, 7)


def case(op, inputs=("x0",), shapes=(X4,), inits=None, opset=17, id=None, **attrs):
    """One test case: an op, its inputs (x0, x1 data; other names initializers; '' omitted)."""
    return pytest.param(op, tuple(inputs), tuple(shapes), inits or {}, opset, attrs, id=id or op)


def f32(v):
    return np.asarray(v, np.float32)


def i64(*v):
    return np.asarray(v, np.int64)


RNG = np.random.default_rng(0)
BN = {
    "s": RNG.uniform(0.5, 2.0, 3).astype(np.float32),
    "b": RNG.standard_normal(3).astype(np.float32),
    "m": RNG.standard_normal(3).astype(np.float32),
    "v": RNG.uniform(0.5, 2.0, 3).astype(np.float32),
}
BN_IN = ("x0", "s", "b", "m", "v")

CASES = [
    case("BatchNormalization", BN_IN, inits=BN, epsilon=1e-3),
    case("BatchNormalization", BN_IN, shapes=((4, 3),), inits=BN, id="BatchNormalization-2d"),
    case("Relu"),
    case("Sigmoid"),
    case("Tanh"),
    case("Identity"),
    case("Dropout"),
    case("LeakyRelu"),
    case("LeakyRelu", alpha=0.2, id="LeakyRelu-alpha"),
    case("Clip", ("x0", "lo", "hi"), inits={"lo": f32(-0.5), "hi": f32(0.7)}, opset=11),
    case("Clip", ("x0", "lo"), inits={"lo": f32(0.0)}, id="Clip-min-only"),
    case("Clip", ("x0", "", "hi"), inits={"hi": f32(0.3)}, id="Clip-max-only"),
    case("Clip", id="Clip-unbounded"),
    case("Flatten"),
    case("Flatten", axis=0, id="Flatten-axis0"),
    case("Flatten", axis=-1, id="Flatten-axis-1"),
    case("Flatten", axis=2, id="Flatten-axis2"),
    case("Reshape", ("x0", "sh"), inits={"sh": i64(0, -1)}, id="Reshape-0-1"),
    case("Reshape", ("x0", "sh"), inits={"sh": i64(0, 7, 0, -1)}, id="Reshape-0-mid"),
    case("Reshape", ("x0", "sh"), inits={"sh": i64(-1, 21)}, id="Reshape-infer-first"),
    case("Squeeze", shapes=((2, 1, 3, 1),), opset=11, axes=[1], id="Squeeze-11"),
    case("Squeeze", ("x0", "ax"), shapes=((2, 1, 3, 1),), inits={"ax": i64(-1)}, opset=13, id="Squeeze-13"),
    case("Squeeze", shapes=((2, 1, 3, 1),), opset=13, id="Squeeze-all"),
    case("Unsqueeze", shapes=((2, 3),), opset=11, axes=[0, 3], id="Unsqueeze-11"),
    case("Unsqueeze", ("x0", "ax"), shapes=((2, 3),), inits={"ax": i64(1, -1)}, opset=13, id="Unsqueeze-13"),
    case("Transpose", perm=[0, 2, 3, 1]),
    case("Transpose", shapes=((2, 3, 4),), id="Transpose-reverse"),
    case("MaxPool", kernel_shape=[2, 2], strides=[2, 2]),
    case("MaxPool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], id="MaxPool-pads"),
    case("MaxPool", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1, id="MaxPool-ceil"),
    case("MaxPool", kernel_shape=[3, 2], strides=[2, 3], pads=[1, 0, 0, 1], ceil_mode=1, id="MaxPool-pads-ceil"),
    case("MaxPool", kernel_shape=[2, 2], strides=[2, 1], dilations=[2, 2], id="MaxPool-dilations"),
    case("MaxPool", kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER", id="MaxPool-same-upper"),
    case("MaxPool", kernel_shape=[4, 4], strides=[2, 2], auto_pad="SAME_LOWER", id="MaxPool-same-lower"),
    case("MaxPool", kernel_shape=[3, 3], auto_pad="VALID", id="MaxPool-valid"),
    case("MaxPool", kernel_shape=[2, 2], storage_order=1, id="MaxPool-storage-order"),
    case("MaxPool", shapes=((2, 3, 11),), kernel_shape=[3], strides=[2], pads=[1, 1], id="MaxPool-1d"),
    case("AveragePool", kernel_shape=[2, 2], strides=[2, 2]),
    case("AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], id="AveragePool-pads"),
    case("AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1, id="AveragePool-pads-include"),
    case("AveragePool", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1, id="AveragePool-ceil"),
    case("AveragePool", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1, count_include_pad=1, id="AveragePool-ceil-include"),
    case("AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 1], ceil_mode=1, count_include_pad=1, id="AveragePool-pads-ceil-include"),
    case("AveragePool", kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER", id="AveragePool-same-upper"),
    case("AveragePool", kernel_shape=[2, 2], strides=[1, 1], auto_pad="SAME_LOWER", count_include_pad=1, id="AveragePool-same-lower-include"),
    case("AveragePool", kernel_shape=[2, 2], strides=[2, 2], dilations=[2, 2], pads=[1, 1, 1, 1], opset=19, id="AveragePool-dilations"),
    case("AveragePool", shapes=((2, 3, 11),), kernel_shape=[4], strides=[3], pads=[2, 1], id="AveragePool-1d"),
    case("GlobalMaxPool"),
    case("GlobalAveragePool"),
    case("GlobalAveragePool", shapes=((2, 3, 9),), id="GlobalAveragePool-1d"),
    case("Pad", ("x0", "p", "c"), inits={"p": i64(0, 0, 1, 2, 0, 0, 3, 0), "c": f32(1.5)}, opset=11),
    case("Pad", ("x0", "p"), inits={"p": i64(0, 0, 2, 1, 0, 0, 1, 3)}, mode="edge", id="Pad-edge"),
    case("Pad", ("x0", "p"), inits={"p": i64(0, 0, 2, 1, 0, 0, 1, 3)}, mode="reflect", id="Pad-reflect"),
    case("Pad", ("x0", "p"), inits={"p": i64(0, 1, -1, 2, 0, 0, 1, -2)}, id="Pad-negative"),
    case("Pad", ("x0", "p", "", "ax"), inits={"p": i64(1, 2, 3, 0), "ax": i64(-1, 2)}, opset=18, id="Pad-axes"),
    case("Pad", opset=10, pads=[0, 0, 1, 1, 0, 0, 1, 1], value=-2.0, id="Pad-opset10"),
    case("Add", ("x0", "x1"), shapes=(X4, (3, 1, 1))),
    case("Add", ("x0", "c"), inits={"c": RNG.standard_normal((1, 3, 1, 7)).astype(np.float32)}, id="Add-const"),
    case("Sub", ("x0", "c"), inits={"c": RNG.standard_normal((3, 1, 1)).astype(np.float32)}, id="Sub-const-second"),
    case("Sub", ("c", "x0"), inits={"c": RNG.standard_normal((3, 1, 1)).astype(np.float32)}, id="Sub-const-first"),
    case("Mul", ("x0", "x0"), id="Mul-same-input"),
    case("Mul", ("c", "x0"), inits={"c": f32(0.25)}, id="Mul-scalar-first"),
    case("Concat", ("x0", "x1"), shapes=(X4, (2, 5, 7, 7)), axis=1),
    case("Concat", ("x0", "c"), inits={"c": RNG.standard_normal((2, 3, 7, 2)).astype(np.float32)}, axis=-1, id="Concat-const-neg-axis"),
    case("Softmax", shapes=((2, 3, 4, 5),), opset=11, id="Softmax-11-default"),
    case("Softmax", shapes=((2, 3, 4, 5),), opset=11, axis=2, id="Softmax-11-axis2"),
    case("Softmax", shapes=((2, 3, 4, 5),), opset=11, axis=-1, id="Softmax-11-last"),
    case("Softmax", shapes=((2, 3, 4, 5),), opset=13, id="Softmax-13-default"),
    case("Softmax", shapes=((2, 3, 4, 5),), opset=13, axis=1, id="Softmax-13-axis1"),
]


def one_node(op, inputs, shapes, inits, opset, attrs):
    """A one-node model (IR version 8 for onnxruntime), its OnnxNode and the data input names."""
    proto = helper.make_node(op, list(inputs), ["y"], name="n", **attrs)
    data = list(dict.fromkeys(i for i in inputs if i and i not in inits))
    infos = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in zip(data, shapes, strict=True)]
    graph = helper.make_graph(
        [proto], "one", infos, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # the output's shape is left to onnxruntime, so no onnx.checker here
    node = OnnxNode("n", op, list(inputs), "y", list(proto.attribute))
    return model, node, data


@pytest.mark.parametrize("op, inputs, shapes, inits, opset, attrs", CASES)
def test_matches_onnxruntime(op, inputs, shapes, inits, opset, attrs):
    model, node, data = one_node(op, inputs, shapes, inits, opset, attrs)
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in zip(data, shapes, strict=True)}
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, feeds)[0]
    data_inputs = [i for i in inputs if i and i not in inits]
    fn = node_function(node, inits, data_inputs, opset, [len(feeds[n].shape) for n in data_inputs])
    got = fn([tf.constant(feeds[n]) for n in data_inputs])
    assert got.dtype == tf.float32
    assert got.shape == want.shape
    assert np.max(np.abs(got.numpy() - want), initial=0.0) <= 1e-5 * max(1.0, float(np.ptp(want)))


@pytest.mark.parametrize("index", [CASES.index(c) for c in CASES if c.id in {
    "Flatten", "Reshape-0-1", "MaxPool-pads-ceil", "AveragePool-pads", "Pad-edge", "Softmax-11-default", "BatchNormalization",
}])
def test_free_batch_in_tf_function(index):
    """Inside a tf.function with a free batch dimension the output keeps its static feature dims."""
    op, inputs, shapes, inits, opset, attrs = CASES[index].values
    model, node, data = one_node(op, inputs, shapes, inits, opset, attrs)
    x = np.random.default_rng(2).standard_normal(shapes[0]).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x0": x})[0]
    fn = node_function(node, inits, ["x0"], opset, [len(shapes[0])])
    traced = tf.function(lambda t: fn([t]), input_signature=[tf.TensorSpec([None, *shapes[0][1:]], tf.float32)])
    out_spec = traced.get_concrete_function().structured_outputs.shape
    assert out_spec[1:] == want.shape[1:]
    np.testing.assert_allclose(traced(x).numpy(), want, atol=1e-5)


def test_gradient_through_pooling_and_softmax():
    def make(op, inputs, opset=17, **attrs):
        return node_function(OnnxNode(op, op, list(inputs), "y", [helper.make_attribute(k, v) for k, v in attrs.items()]), {}, ["x"], opset, [4])

    pool = make("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)
    maxpool = make("MaxPool", ["x"], kernel_shape=[2, 2], pads=[0, 0, 1, 1])
    softmax = make("Softmax", ["x"], opset=11)
    x = tf.Variable(np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32))
    with tf.GradientTape() as tape:
        y = softmax([maxpool([pool([x])])])
        loss = tf.reduce_sum(y * tf.range(tf.size(y, out_type=tf.float32), dtype=tf.float32)[: y.shape[-1]])
    grad = tape.gradient(loss, x).numpy()
    assert np.all(np.isfinite(grad)) and np.count_nonzero(grad) > 0


@pytest.mark.parametrize("op, inputs, attrs, opset, match", [
    ("MaxPool", ["x"], {"kernel_shape": [2, 2], "auto_pad": "SAME"}, 17, r"'n' \(MaxPool with auto_pad=SAME\)"),
    ("MaxPool", ["x"], {"kernel_shape": [2, 2, 2, 2]}, 17, r"'n' \(MaxPool with 4 spatial"),
    ("Pad", ["x", "p"], {"mode": "wrap"}, 19, r"'n' \(Pad with mode=wrap\)"),
    ("Reshape", ["x", "shape"], {}, 17, r"'n' \(Reshape with a non-constant shape\)"),
    ("BatchNormalization", ["x", "s", "b", "m", "v"], {"training_mode": 1}, 15, r"'n' \(BatchNormalization in training"),
    ("Conv", ["x", "w"], {}, 17, r"'n' \(Conv has no TF implementation\)"),
])
def test_unsupported_raises_model_error(op, inputs, attrs, opset, match):
    init = {k: np.ones(3, np.float32) for k in ("p", "s", "b", "m", "v", "w")}
    node = OnnxNode("n", op, inputs, "y", [helper.make_attribute(k, v) for k, v in attrs.items()])
    data = [i for i in inputs if i not in init]
    with pytest.raises(ModelError, match=match) as err:
        node_function(node, init, data, opset, [4] * len(data))
    assert "\n" not in str(err.value)

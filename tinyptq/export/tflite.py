"""TFLite export of W2..8 A8 states, with tinyptq's encodings (read back by tflite_check).

The graph is rebuilt as a tf_keras model in the form the TFLite converter
knows from quantization-aware training: every kernel is the dequantized
integer kernel behind ``tf.quantization.fake_quant_with_min_max_vars``
(per channel where the encoding is), every activation point is followed by a
FakeQuant with exactly the range of its encoding. The converter then takes
those ranges as the tensors' scales and zero points instead of choosing its
own; no calibration data is needed.

Activations are int8: uint8 grids become int8 with the zero point moved by
128 (the same grid). Weights must be symmetric with 2 to 8 bits: kernels of
5 to 8 bits are int8 tensors (on their narrower grid), kernels of 2 to 4 bits
are packed INT4 tensors (tflite_int4) unless ``pack_int4=False`` keeps them in
int8 too. Other bit-widths raise ConfigError.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from tinyptq._tf import _muted_stderr, keras, tf
from tinyptq.errors import ConfigError, ModelError, first_line
from tinyptq.fixedpoint import bias_int32
from tinyptq.quant import Encoding

ACT_PREFIX = "tinyptq_act__"


def check_exportable(state: Any) -> None:
    """Raise ConfigError unless every tensor of ``state`` has a TFLite-compatible encoding."""
    from tinyptq.graph.keras_graph import KerasGraph

    if not isinstance(state.graph, KerasGraph):
        raise ConfigError(f"TFLite export needs a Keras model, not {type(state.graph).__name__}: export onnx instead")
    layers = state.graph.quant_layers()
    points = state.graph.act_points()
    for layer in layers:
        if layer.bn is not None:
            raise ConfigError(f"TFLite export needs folded batch norms ('{layer.bn}'): add bn_folding to the pipeline")
        enc = state.weight_encodings.get(layer.name)
        if enc is None:
            raise ConfigError(f"TFLite export needs every layer quantized: '{layer.name}' is float")
        if not 2 <= enc.bits <= 8:
            raise ConfigError(f"TFLite export needs 2- to 8-bit weights: '{layer.name}' has {enc.bits} bits")
        if not enc.symmetric or np.any(enc.zero_point != 0):
            raise ConfigError(f"TFLite export needs symmetric weights: '{layer.name}' is asymmetric")
    for p in points:
        enc = state.act_encodings.get(p.name)
        if enc is None:
            raise ConfigError(f"TFLite export needs every activation quantized: '{p.name}' is float")
        if enc.bits != 8:
            raise ConfigError(f"TFLite export needs 8-bit activations: '{p.name}' has {enc.bits} bits")
        if enc.per_channel:
            raise ConfigError(f"TFLite export needs per-tensor activations: '{p.name}' is per channel")


def tflite_bytes(state: Any, pack_int4: bool = True) -> bytes:
    """The .tflite flatbuffer of a state (float input and output, int8 / int4 inside).

    ``pack_int4=False`` keeps 2- to 4-bit kernels in int8 tensors instead of INT4.
    """
    check_exportable(state)
    model = _fake_quant_model(state)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    try:
        with warnings.catch_warnings(), _muted_stderr():  # the converter's log lines and notices
            warnings.simplefilter("ignore")
            data = converter.convert()
    except Exception as exc:  # the MLIR converter raises its own error types
        raise ModelError(f"TFLite conversion failed: {first_line(exc, 200)}") from None
    data = _pin_weights(data, state)
    if not pack_int4:
        return data
    from tinyptq.export.tflite_int4 import pack_int4_kernels

    return pack_int4_kernels(data, state)


def export_tflite(state: Any, path: str | Path, pack_int4: bool = True) -> Path:
    """Write the .tflite model of a state to ``path``; return the path."""
    data = tflite_bytes(state, pack_int4)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


# ------------------------------------------------------------- the model
def _act_range(enc: Encoding) -> tuple[float, float, bool]:
    """min / max / narrow_range of a FakeQuant op whose 8-bit grid is ``enc``'s."""
    return float(enc.min), float(enc.max), bool(enc.narrow_range)


def _fake_quant_model(state: Any) -> Any:
    from tinyptq.graph.keras_build import MERGE_LAYERS

    graph = state.graph
    kernels = state.quantized_kernels()
    tensors: dict[str, Any] = {}
    inputs = []
    for node in graph.nodes:
        if node.class_name == "InputLayer":
            t = keras.Input(shape=node.config["batch_input_shape"][1:], name=node.name)
            inputs.append(t)
        elif node.name in kernels:
            layer = _QuantCompute(node, kernels[node.name], state.weight_encodings[node.name], name=node.name)
            t = layer(tensors[node.inputs[0]])
        else:
            layer = keras.layers.deserialize({"class_name": node.class_name, "config": dict(node.config)})
            args = [tensors[i] for i in node.inputs]
            t = layer(args if node.class_name in MERGE_LAYERS else args[0])
            if node.weights:
                layer.set_weights(node.weights)
        if node.name in state.act_encodings:
            t = _ActFakeQuant(*_act_range(state.act_encodings[node.name]), name=ACT_PREFIX + node.name)(t)
        tensors[node.name] = t
    return keras.Model(inputs, [tensors[o] for o in graph.output_names], name=f"{graph.name}_tflite")


class _ActFakeQuant(keras.layers.Layer):
    """tf.quantization.fake_quant_with_min_max_vars with fixed limits (what the converter reads)."""

    def __init__(self, lo: float, hi: float, narrow_range: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lo, self.hi, self.narrow_range = lo, hi, narrow_range

    def call(self, inputs: Any) -> Any:
        return tf.quantization.fake_quant_with_min_max_vars(
            inputs, self.lo, self.hi, num_bits=8, narrow_range=self.narrow_range
        )


class _QuantCompute(keras.layers.Layer):
    """Conv2D / DepthwiseConv2D / Dense on a fake-quantized constant kernel (TFLite reads its grid)."""

    def __init__(self, node: Any, kernel: np.ndarray, enc: Encoding, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        cfg = node.config
        self.kind = node.class_name
        if self.kind == "Conv2D" and int(cfg.get("groups", 1) or 1) != 1:
            raise ModelError(f"TFLite export: grouped convolution '{node.name}' is not supported")
        if cfg.get("data_format") not in (None, "channels_last"):
            raise ModelError(f"TFLite export: '{node.name}' is not channels_last")
        self.kernel = np.asarray(kernel, np.float32)
        self.bias = np.asarray(node.weights[1], np.float32) if cfg.get("use_bias", True) and len(node.weights) > 1 else None
        self.enc = enc
        self.strides = tuple(cfg.get("strides", (1, 1)))
        self.dilations = tuple(cfg.get("dilation_rate", (1, 1)))
        self.padding = str(cfg.get("padding", "valid")).upper()

    def _kernel(self) -> Any:
        """The kernel through FakeQuant (per channel on its last axis), or as the converter sees it."""
        enc, kernel = self.enc, self.kernel
        if self.kind == "Dense" and enc.per_channel:
            kernel = kernel.reshape(1, 1, *kernel.shape)  # run as a 1x1 convolution, see call()
        if enc.per_channel and enc.axis % self.kernel.ndim != self.kernel.ndim - 1:
            # depthwise (kh, kw, channels, 1): FakeQuant quantizes the last axis only, so the
            # on-grid kernel goes in as it is and the converter's per-channel max/127 scale
            # finds the same grid (checked by read-back)
            return tf.constant(kernel)
        k = tf.constant(kernel)
        if not enc.per_channel:
            return tf.quantization.fake_quant_with_min_max_vars(
                k, float(enc.min), float(enc.max), num_bits=8, narrow_range=enc.narrow_range
            )
        return tf.quantization.fake_quant_with_min_max_vars_per_channel(
            k, enc.min, enc.max, num_bits=8, narrow_range=enc.narrow_range
        )

    def call(self, x: Any) -> Any:
        k = self._kernel()
        if self.kind == "Conv2D":
            y = tf.nn.conv2d(x, k, strides=self.strides, padding=self.padding, dilations=self.dilations)
        elif self.kind == "DepthwiseConv2D":
            y = tf.nn.depthwise_conv2d(
                x, k, strides=(1, *self.strides, 1), padding=self.padding, dilations=self.dilations
            )
        elif len(x.shape) == 2 and self.enc.per_channel:
            # TFLite takes per-channel FakeQuant on a dense kernel only as a 1x1 convolution
            # (the FULLY_CONNECTED kernel is transposed, and its quantized axis with it)
            n_in, n_out = self.kernel.shape
            y = tf.nn.conv2d(tf.reshape(x, (-1, 1, 1, n_in)), k, 1, "VALID")
            y = tf.reshape(y, (-1, n_out))
        elif len(x.shape) == 2:
            y = tf.matmul(x, k)
        else:
            y = tf.tensordot(x, k, axes=1)
        return y if self.bias is None else tf.nn.bias_add(y, self.bias)


def interpreter(model: bytes | str | Path) -> Any:
    """A tf.lite.Interpreter of a .tflite file or its bytes."""
    with warnings.catch_warnings():  # tf.lite.Interpreter announces its move to LiteRT
        warnings.simplefilter("ignore")
        if isinstance(model, (bytes, bytearray)):
            return tf.lite.Interpreter(model_content=bytes(model))
        return tf.lite.Interpreter(model_path=str(model))


def tflite_predict(model: bytes | str | Path, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Run a .tflite model (float input / output) over ``x`` in batches."""
    interp = interpreter(model)
    inp = interp.get_input_details()[0]
    out_index = interp.get_output_details()[0]["index"]
    parts, size = [], None
    for start in range(0, len(x), batch_size):
        batch = np.asarray(x[start : start + batch_size], np.float32)
        if size != len(batch):
            interp.resize_tensor_input(inp["index"], [len(batch), *batch.shape[1:]])
            interp.allocate_tensors()
            size = len(batch)
        interp.set_tensor(inp["index"], batch)
        interp.invoke()
        parts.append(interp.get_tensor(out_index).copy())
    return np.concatenate(parts, axis=0)


# --------------------------------------------------- weights as we chose them
KERNEL_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}


def owner(tensor_name: str) -> str | None:
    """The Keras layer a converted tensor is named after ('model/layer/Op;...' -> 'layer')."""
    parts = tensor_name.split(";")[0].split("/")
    return parts[1] if len(parts) > 2 else None


def tflite_kernel_layout(q: np.ndarray, op_name: str) -> np.ndarray:
    """A Keras-layout kernel in the layout of the TFLite op that holds it."""
    if op_name == "DEPTHWISE_CONV_2D":  # (kh, kw, in, mult) -> (1, kh, kw, in * mult)
        return q.reshape(1, q.shape[0], q.shape[1], -1)
    if q.ndim == 2:  # dense (in, out) -> (out, in), or (out, 1, 1, in) as a 1x1 convolution
        return q.T if op_name == "FULLY_CONNECTED" else q.T.reshape(q.shape[1], 1, 1, q.shape[0])
    return np.transpose(q, (3, 0, 1, 2))  # conv (kh, kw, in, out) -> (out, kh, kw, in)


def _pin_weights(data: bytes, state: Any) -> bytes:
    """Overwrite kernels and biases with tinyptq's integers and scales.

    The converter re-derives the weight grids from FakeQuant limits (or, for
    per-channel depthwise kernels, from each channel's max / 127); writing
    our integers, scales and the biases at ``s_in * s_w`` back makes the file
    hold exactly what the simulation used whatever the converter chose.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    graph = model.subgraphs[0]
    _pin_activation_scales(graph, state)  # first: the biases are computed on the input scales
    ints = state.integer_kernels()
    for op in graph.operators:
        op_name = _op_name(model, op)
        if op_name not in KERNEL_OPS:
            continue
        w_tensor = graph.tensors[op.inputs[1]]
        layer = owner(w_tensor.name.decode())
        if layer not in ints:
            raise ModelError(f"TFLite export: cannot tell which layer kernel '{w_tensor.name.decode()}' belongs to")
        enc = state.weight_encodings[layer]
        q = tflite_kernel_layout(ints[layer], op_name)
        if tuple(w_tensor.shape) != q.shape:
            raise ModelError(f"TFLite export: kernel of '{layer}' has shape {tuple(w_tensor.shape)}, not {q.shape}")
        channels = q.shape[-1] if op_name == "DEPTHWISE_CONV_2D" else q.shape[0]
        w_scale = np.broadcast_to(enc.scale, (channels,)) if enc.per_channel else enc.scale.reshape(1)
        _set_tensor(model, w_tensor, q.astype(np.int8), w_scale, 3 if op_name == "DEPTHWISE_CONV_2D" else 0)
        if len(op.inputs) > 2 and op.inputs[2] >= 0:
            s_in = np.float32(graph.tensors[op.inputs[0]].quantization.scale[0])
            b_scale = (np.float64(s_in) * w_scale.astype(np.float64)).astype(np.float32)
            bias = state.graph.bias(layer)
            bias = np.zeros(channels, np.float32) if bias is None else bias
            _set_tensor(model, graph.tensors[op.inputs[2]], bias_int32(bias, s_in, w_scale).astype(np.int32), b_scale, 0)
    _shorten_names(graph)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _pin_activation_scales(graph: Any, state: Any) -> None:
    """Give every int8 activation tensor exactly the float32 scale of the encoding it stands for.

    The converter derives scales from FakeQuant limits in float, and the one
    of the model input's QUANTIZE can come out one float32 step off ours;
    integer kernels would then requantize with another multiplier than the
    simulation. A tensor whose (scale, zero point) is within 1e-6 of one of
    our activation encodings (reshapes and pools carry their input's) gets
    that encoding's scale.
    """
    from tensorflow.lite.python import schema_py_generated as schema

    ours = {}
    for enc in state.act_encodings.values():
        if enc.bits == 8 and not enc.per_channel:
            zp = int(enc.zero_point) - (0 if enc.signed else 128)
            ours.setdefault(zp, []).append(np.float32(enc.scale))
    for tensor in graph.tensors:
        q = tensor.quantization
        if tensor.type != schema.TensorType.INT8 or q is None or q.scale is None or len(q.scale) != 1:
            continue
        candidates = ours.get(int(q.zeroPoint[0]), [])
        scale = np.float32(q.scale[0])
        close = [c for c in candidates if abs(float(c) - float(scale)) <= 1e-6 * float(c)]
        if close:
            q.scale = [float(min(close, key=lambda c: abs(float(c) - float(scale))))]


def _shorten_names(graph: Any) -> None:
    """'model/layer/Op;model/layer/Op2;...' -> its first alias (what owner() reads), ';<index>' where shared."""
    short = [t.name.split(b";")[0] for t in graph.tensors]
    counts = Counter(short)
    for i, (tensor, name) in enumerate(zip(graph.tensors, short, strict=True)):
        tensor.name = name if counts[name] == 1 else name + f";{i}".encode()


def _op_name(model: Any, op: Any) -> str:
    from tensorflow.lite.python import schema_py_generated as schema

    code = model.operatorCodes[op.opcodeIndex]
    builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    return names.get(builtin, str(builtin))


def _set_tensor(model: Any, tensor: Any, values: np.ndarray, scales: np.ndarray, axis: int) -> None:
    buf = model.buffers[tensor.buffer]
    raw = np.frombuffer(np.ascontiguousarray(values).tobytes(), np.uint8)
    if buf.data is None or len(buf.data) != raw.size:
        raise ModelError(f"TFLite export: unexpected buffer for tensor '{tensor.name.decode()}'")
    buf.data = raw.copy()
    tensor.quantization.scale = [float(s) for s in np.asarray(scales, np.float32)]
    tensor.quantization.zeroPoint = [0] * len(tensor.quantization.scale)
    tensor.quantization.quantizedDimension = axis

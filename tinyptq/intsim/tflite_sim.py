"""The ``tflite`` simulation target: a state run in the integers TFLite Micro computes.

The exported .tflite holds int8 tensors (uint8 grids moved by -128), int8
kernels with per-channel scales and int32 biases at ``s_in * s_w``. Its
kernels accumulate exactly in int32 and requantize with a Q31 multiplier and
shift (tinyptq.fixedpoint); pooling and softmax have their own integer
arithmetic and fixed grids. This module walks the framework-neutral graph
with the same placement of activation points as the fake-quant simulation
(tinyptq.graph.placement) and computes every tensor as the runtime does:

- model input: QUANTIZE (halves away from zero);
- conv / depthwise / dense (+ folded BN, fused ReLU / ReLU6) and add
  (+ fused ReLU): int32 accumulation, requantization to the point's grid,
  the fused activation's clamp;
- average pooling: the integer mean on the input's grid, then a requantize
  to the point's grid (the QUANTIZE op the converter inserts);
- softmax: the integer softmax onto 1/256, then a requantize;
- shape-only operations (reshape, flatten, dropout, max pooling, zero
  padding): the integers unchanged;
- model outputs: DEQUANTIZE.

Accumulations run in float64 TF convolutions of integer values, exact far
beyond int32 sums of int8 products; requantization runs in int64 numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tinyptq.errors import ConfigError, ModelError
from tinyptq.fixedpoint import bias_int32, tflite_round
from tinyptq.graph.placement import LAYER_KINDS, PASS_THROUGH
from tinyptq.intsim import tflite_kernels as k
from tinyptq.quant import Encoding

FUSABLE = frozenset({"relu", "relu6"})


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of an int8 tensor as TFLite stores it."""

    scale: float
    zero_point: int


def int8_params(enc: Encoding, what: str) -> QParams:
    """An 8-bit per-tensor activation encoding as an int8 tensor's parameters."""
    if enc.bits != 8:
        raise ConfigError(f"the tflite target needs 8-bit activations: '{what}' has {enc.bits} bits")
    if enc.per_channel:
        raise ConfigError(f"the tflite target needs per-tensor activations: '{what}' is per channel")
    zp = int(enc.zero_point) - (0 if enc.signed else 128)
    return QParams(float(np.float32(enc.scale)), zp)


@dataclass
class _Value:
    q: np.ndarray  # int8 values
    params: QParams


class TfliteSim:
    """Integer inference of a state as TFLite Micro runs its exported .tflite."""

    def __init__(self, state: Any) -> None:
        self.graph = graph = state.graph
        self.points = {p.name: p for p in graph.act_points()}
        self.layers = {layer.name: layer for layer in graph.quant_layers()}
        self.order = graph.node_names()
        self.kind = {n: graph.op_type(n) for n in self.order}
        self.consumers: dict[str, list[str]] = {n: [] for n in self.order}
        for n in self.order:
            for i in graph.inputs_of(n):
                self.consumers[i].append(n)
        self.params = {}
        for name in self.points:
            enc = state.act_encodings.get(name)
            if enc is None:
                raise ConfigError(f"the tflite target needs every activation quantized: '{name}' is float")
            self.params[name] = int8_params(enc, name)
        self.per_tensor: dict[str, bool] = {}
        self.weights = self._weights(state)
        self._functions: dict[str, Any] = {}

    # ------------------------------------------------------------ set-up
    def _weights(self, state: Any) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None, Any]]:
        """Per layer: canonical integer kernel (float64), per-channel scales (float32), float bias, spec."""
        ints = state.integer_kernels()
        out = {}
        for name, layer in self.layers.items():
            if layer.bn is not None:
                raise ConfigError(f"the tflite target needs folded batch norms ('{layer.bn}'): add bn_folding")
            enc = state.weight_encodings.get(name)
            if enc is None:
                raise ConfigError(f"the tflite target needs every layer quantized: '{name}' is float")
            if enc.bits > 8 or not enc.symmetric or np.any(enc.zero_point != 0):
                raise ConfigError(f"the tflite target needs symmetric weights of at most 8 bits: '{name}'")
            spec = self.graph.layer_spec(name)
            kernel = self.graph.kernel_layout(name).to_canonical(ints[name]).astype(np.float64)
            scales = np.broadcast_to(np.asarray(enc.scale, np.float32), (spec.out_channels,)).copy()
            out[name] = (kernel, scales, self.graph.bias(name), spec)
            self.per_tensor[name] = not enc.per_channel
        return out

    def _chain_end(self, name: str) -> tuple[str, str | None, list[str]]:
        """The point that quantizes ``name``'s fused chain, its activation, the nodes it swallows."""
        cur, act, swallowed = name, None, []
        while cur not in self.points:
            cons = self.consumers[cur]
            if len(cons) != 1:
                raise ModelError(f"tflite target: '{cur}' has no quantized output")
            cur = cons[0]
            kind = self.kind[cur]
            if kind == "batch_norm":
                raise ConfigError(f"the tflite target needs folded batch norms ('{cur}'): add bn_folding")
            if kind not in FUSABLE:
                raise ModelError(f"tflite target: cannot fuse '{cur}' ({kind}) into '{name}'")
            act = kind
            swallowed.append(cur)
        return cur, act, swallowed

    def _call(self, name: str, x: np.ndarray) -> np.ndarray:
        """The adapter's own operation on (float-coded integer) values."""
        from tinyptq._tf import tf

        if name not in self._functions:
            self._functions[name] = self.graph.node_function(name)
        return np.asarray(self._functions[name]([tf.constant(x)]))

    # --------------------------------------------------------------- run
    def run_int8(
        self, x: np.ndarray, outputs: list[str] | None = None
    ) -> dict[str, tuple[np.ndarray, QParams]]:
        """The int8 values (and their parameters) of the model outputs (or of ``outputs``) for a batch ``x``."""
        values: dict[str, _Value] = {}
        skip: set[str] = set()
        for n in self.order:
            if n in skip:
                continue
            kind = self.kind[n]
            ins = [values[i] for i in self.graph.inputs_of(n)]
            if kind == "input":
                p = self.params[n]
                values[n] = _Value(k.quantize(np.asarray(x, np.float32), p.scale, p.zero_point), p)
            elif kind in LAYER_KINDS or kind == "add":
                end, act, swallowed = self._chain_end(n)
                skip.update(swallowed)
                p = self.params[end]
                q = self._layer(n, ins[0], p, act) if kind in LAYER_KINDS else self._add(ins, p, act)
                values[end] = _Value(q, p)
                if end != n:
                    values[n] = values[end]
            elif kind in PASS_THROUGH:
                values[n] = _Value(self._pass_through(n, kind, ins[0]), ins[0].params)
            elif kind == "avg_pool":  # AVERAGE_POOL_2D on the input's grid, then QUANTIZE
                values[n] = self._requantized(n, self._avg_pool(n, ins[0]), ins[0].params)
            elif kind == "global_avg_pool":  # MEAN, which requantizes itself
                src, p = ins[0], self.params[n]
                if src.q.ndim != 4:
                    raise ModelError(f"tflite target: global pooling '{n}' needs an NHWC input")
                q = k.mean_hw(src.q, src.params.zero_point, src.params.scale, p.zero_point, p.scale)
                values[n] = _Value(q, p)
            elif kind == "softmax":
                src = ins[0]
                q = k.softmax(src.q, src.params.scale, src.params.zero_point)
                values[n] = self._requantized(n, q, QParams(1.0 / 256.0, -128))
            elif kind in FUSABLE:
                values[n] = self._relu(n, kind, ins[0])
            else:
                raise ModelError(f"tflite target: unsupported operation '{n}' ({kind})")
        return {o: (values[o].q, values[o].params) for o in outputs or self.graph.output_names}

    def predict(self, x: np.ndarray, batch_size: int = 128) -> np.ndarray:
        """The model's (first) output as TFLite Micro returns it, dequantized to float32."""
        out = self.graph.output_names[0]
        parts = []
        for start in range(0, len(x), batch_size):
            q, p = self.run_int8(x[start : start + batch_size])[out]
            parts.append(k.dequantize(q, p.scale, p.zero_point))
        return np.concatenate(parts, axis=0)

    # ----------------------------------------------------------- operators
    def _layer(self, name: str, src: _Value, out: QParams, act: str | None) -> np.ndarray:
        from tinyptq._tf import tf
        from tinyptq.executor import run_conv, run_dense

        kernel, w_scales, bias, spec = self.weights[name]
        centered = tf.constant(src.q.astype(np.float64) - src.params.zero_point)
        if spec.kind == "dense":
            acc = run_dense(centered, tf.constant(kernel), None).numpy()
        else:
            acc = run_conv(spec, centered, tf.constant(kernel), None).numpy()
        acc = np.rint(acc).astype(np.int64)
        channels_first = spec.kind != "dense" and not spec.channels_last
        if channels_first:
            acc = np.moveaxis(acc, 1, -1)
        b = bias_int32(bias, src.params.scale, w_scales) if bias is not None else None
        # a per-tensor dense layer is a FULLY_CONNECTED op (its multiplier from the float32
        # product s_in * s_w); per-channel dense layers go out as 1x1 CONV_2D
        per_tensor_dense = spec.kind == "dense" and self.per_tensor[name]
        q = k.requantize_accumulator(
            acc, b, src.params.scale, w_scales, out.scale, out.zero_point, act, float32_product=per_tensor_dense
        )
        return np.moveaxis(q, -1, 1) if channels_first else q

    def _add(self, ins: list[_Value], out: QParams, act: str | None) -> np.ndarray:
        if len(ins) != 2:
            raise ModelError(f"tflite target: add of {len(ins)} inputs is not supported")
        a, b = ins
        return k.add(
            a.q, a.params.zero_point, a.params.scale, b.q, b.params.zero_point, b.params.scale,
            out.scale, out.zero_point, act,
        )

    def _pass_through(self, name: str, kind: str, src: _Value) -> np.ndarray:
        if kind in ("identity", "dropout"):
            return src.q
        centered = src.q.astype(np.float32) - src.params.zero_point  # zero padding pads the zero point
        y = self._call(name, centered)
        return (np.rint(y) + src.params.zero_point).astype(np.int8)

    def _avg_pool(self, name: str, src: _Value) -> np.ndarray:
        """TFLite's int8 average pool (same grid in and out): the rounded mean of the stored values."""
        mean = self._call(name, src.q.astype(np.float32)).astype(np.float64)
        return np.clip(tflite_round(mean), -128, 127).astype(np.int8)

    def _requantized(self, name: str, q: np.ndarray, params: QParams) -> _Value:
        """``q`` moved onto the grid of ``name``'s point when it has one (a QUANTIZE op in the file)."""
        out = self.params.get(name)
        if out is None or out == params:
            return _Value(q, params)
        return _Value(k.requantize(q, params.scale, params.zero_point, out.scale, out.zero_point), out)

    def _relu(self, name: str, kind: str, src: _Value) -> _Value:
        out = self.params[name]
        q = k.requantize(src.q, src.params.scale, src.params.zero_point, out.scale, out.zero_point)
        lo, hi = k.activation_range(kind, out.scale, out.zero_point)
        return _Value(np.clip(q, lo, hi).astype(np.int8), out)


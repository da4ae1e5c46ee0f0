"""One differentiable TF program of the framework-neutral graph, for Keras and ONNX models alike.

The executor walks ``ModelGraph.node_names()`` and runs every quantizable
layer itself from its ``LayerSpec`` (canonical kernel, strides, pads, groups),
every other node through the adapter's ``node_function``, and puts a
fake-quantizer after every activation point and on every kernel. Kernels,
biases and the quantizers' encodings and enabled flags are TF variables: a
change takes effect in the next call, with no rebuild, and gradients flow to
inputs, kernels, biases and scales.

Any sub-graph can be run on its own: ``function(outputs, inputs)`` takes the
raw values of the ``inputs`` nodes (their quantizers are applied, as for the
model input) and computes only what ``outputs`` need.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tinyptq._tf import tf
from tinyptq.errors import ConfigError
from tinyptq.graph.base import ModelGraph
from tinyptq.graph.spec import LayerSpec
from tinyptq.quant import Encoding, fake_quant_tf

ACTIVATION, WEIGHT = "activation", "weight"


class Quantizer:
    """A fake-quantizer whose encoding and enabled flag are TF variables.

    A kernel quantizer (``channels`` given) keeps one scale and zero point per
    output channel along ``channel_axis`` (a per-tensor encoding is repeated:
    the same grid, bit for bit); an activation quantizer keeps scalars. The
    grid limits are variables too, so a new bit-width needs no rebuild either.
    Variable shapes never change, so gradients flow through the on/off branch.
    """

    def __init__(self, name: str, channel_axis: int, channels: int | None = None, rng: Any = None) -> None:
        self.name = name
        self.rng = rng  # tf.random.Generator for QDrop (None: dropping unavailable)
        self.channel_axis = channel_axis
        self.channels = channels
        self.encoding: Encoding | None = None
        shape = () if channels is None else (channels,)
        self._scale = tf.Variable(np.ones(shape, np.float32), name="scale")  # trainable: learned steps
        self._zero_point = tf.Variable(np.zeros(shape, np.float32), trainable=False, name="zero_point")
        self._qmin = tf.Variable(0.0, trainable=False, name="qmin")
        self._qmax = tf.Variable(255.0, trainable=False, name="qmax")
        self._enabled = tf.Variable(False, trainable=False, name="enabled")
        self._drop = tf.Variable(0.0, trainable=False, name="drop")

    @property
    def enabled(self) -> bool:
        """Whether the quantizer is applied."""
        return bool(self._enabled.numpy())

    @property
    def scale(self) -> Any:
        """The scale variable (differentiable, e.g. for learned step sizes)."""
        return self._scale

    def set_encoding(self, enc: Encoding) -> None:
        """Use ``enc`` from the next call on (it stays enabled or disabled as it was)."""
        if self.channels is None:
            if enc.per_channel:
                raise ConfigError(f"'{self.name}': per-channel activation encodings are not simulated")
            shape: tuple[int, ...] = ()
        else:
            if enc.per_channel and enc.scale.shape[0] != self.channels:
                raise ConfigError(
                    f"encoding of '{self.name}' has {enc.scale.shape[0]} channels, the kernel {self.channels}"
                )
            shape = (self.channels,)
        self._scale.assign(np.broadcast_to(enc.scale, shape).astype(np.float32))
        self._zero_point.assign(np.broadcast_to(enc.zero_point, shape).astype(np.float32))
        self._qmin.assign(float(enc.qmin))
        self._qmax.assign(float(enc.qmax))
        self.encoding = enc

    def set_drop(self, probability: float) -> None:
        """QDrop: keep each value in float with this probability (0: always quantize)."""
        if not 0.0 <= float(probability) <= 1.0:
            raise ConfigError(f"drop probability of '{self.name}' must be in [0, 1], got {probability!r}")
        if probability and self.rng is None:
            raise ConfigError(f"quantizer '{self.name}' has no random generator for dropping")
        self._drop.assign(float(probability))

    def enable(self, on: bool = True) -> None:
        """Switch the quantizer on (or off)."""
        if on and self.encoding is None:
            raise ConfigError(f"quantizer '{self.name}' has no encoding to enable")
        self._enabled.assign(bool(on))

    def __call__(self, x: Any) -> Any:
        """``x`` fake-quantized when enabled, else ``x`` itself."""
        rank = len(x.shape)
        shape = [1] * rank
        shape[self.channel_axis % rank] = -1

        def quantized() -> Any:
            scale = tf.reshape(self._scale, shape)
            zero_point = tf.reshape(self._zero_point, shape)
            return fake_quant_tf(x, scale, zero_point, self._qmin.read_value(), self._qmax.read_value())

        def dropped() -> Any:  # QDrop: a random part of the values stays in float
            keep_float = self.rng.uniform(tf.shape(x)) < self._drop
            return tf.where(keep_float, x, quantized())

        def on() -> Any:
            return tf.cond(self._drop > 0.0, dropped, quantized) if self.rng is not None else quantized()

        # a branch, not tf.where: a disabled quantizer costs nothing
        return tf.cond(self._enabled, on, lambda: tf.identity(x))


class Executor:
    """The neutral graph as a TF program with variables for kernels, biases and quantizers.

    Built once from the graph as it is at construction; later changes go
    through ``set_kernel`` / ``set_bias`` / the quantizers, not through the graph.
    All quantizers start disabled (the float model).
    """

    def __init__(self, graph: ModelGraph) -> None:
        self.graph = graph
        self.order = graph.node_names()
        self.input_name = self.order[0]
        self.inputs = {n: graph.inputs_of(n) for n in self.order}
        self.specs: dict[str, LayerSpec] = {q.name: graph.layer_spec(q.name) for q in graph.quant_layers()}
        self.functions: dict[str, Callable[[list[Any]], Any]] = {
            n: graph.node_function(n) for n in self.order[1:] if n not in self.specs
        }
        self.kernels = {n: tf.Variable(s.kernel, name=f"{_safe(n)}_kernel") for n, s in self.specs.items()}
        self.biases = {
            n: tf.Variable(s.bias, name=f"{_safe(n)}_bias") for n, s in self.specs.items() if s.bias is not None
        }
        self.rng = tf.random.Generator.from_seed(0)  # QDrop's draws: same seed, same draws
        self.act_quantizers = {
            p.name: Quantizer(p.name, graph.tensor_channel_axis(p.name), rng=self.rng) for p in graph.act_points()
        }
        # a layer whose kernel is computed by a function (e.g. AdaRound's soft rounding), not its quantizer
        self.weight_transforms: dict[str, Callable[[Any, Quantizer], Any]] = {}
        # canonical kernels: output channels first
        self.weight_quantizers = {n: Quantizer(n, 0, s.out_channels) for n, s in self.specs.items()}
        self._compiled: dict[tuple, Any] = {}

    # --------------------------------------------------------------- changes
    def quantizer(self, name: str, kind: str = ACTIVATION) -> Quantizer:
        """The activation quantizer of point ``name`` or the weight quantizer of layer ``name``."""
        table = {ACTIVATION: self.act_quantizers, WEIGHT: self.weight_quantizers}.get(kind)
        if table is None:
            raise ConfigError(f"unknown quantizer kind '{kind}'; valid: {ACTIVATION}, {WEIGHT}")
        if name not in table:
            what = "activation point" if kind == ACTIVATION else "quantizable layer"
            raise ConfigError(f"no {what} named '{name}'")
        return table[name]

    def set_encoding(self, name: str, enc: Encoding, kind: str = ACTIVATION) -> None:
        """Set the encoding of one quantizer (kernels: per tensor or per output channel)."""
        self.quantizer(name, kind).set_encoding(enc)

    def set_kernel(self, layer: str, kernel: np.ndarray) -> None:
        """Replace a kernel; ``kernel`` in the graph's layout (as ``graph.kernel`` gives it)."""
        canonical = self.graph.kernel_layout(layer).to_canonical(np.asarray(kernel, np.float32))
        self.set_canonical_kernel(layer, canonical)

    def set_canonical_kernel(self, layer: str, kernel: np.ndarray) -> None:
        """Replace a kernel given in the canonical (out, in // groups, *taps) layout."""
        var = self._layer_var(self.kernels, layer, "kernel")
        if tuple(kernel.shape) != tuple(var.shape):
            raise ConfigError(f"kernel of '{layer}' has shape {tuple(var.shape)}, not {tuple(kernel.shape)}")
        var.assign(np.asarray(kernel, np.float32))

    def set_bias(self, layer: str, bias: np.ndarray) -> None:
        """Replace a bias (a layer built without one gets it, at the cost of one retrace)."""
        bias = np.asarray(bias, np.float32).reshape(-1)
        spec = self.specs.get(layer)
        if spec is None:
            raise ConfigError(f"no quantizable layer named '{layer}'")
        if bias.shape != (spec.out_channels,):
            raise ConfigError(f"bias of '{layer}' needs {spec.out_channels} values, got {bias.shape}")
        if layer in self.biases:
            self.biases[layer].assign(bias)
        else:
            self.biases[layer] = tf.Variable(bias, name=f"{_safe(layer)}_bias")
            self._compiled.clear()

    def set_weight_transform(self, layer: str, transform: Callable[[Any, Quantizer], Any] | None) -> None:
        """Compute ``layer``'s kernel as ``transform(kernel_variable, weight_quantizer)`` (None: back to
        the quantizer). The transform may read its own variables (e.g. AdaRound's rounding logits);
        compiled functions are traced again once."""
        if layer not in self.specs:
            raise ConfigError(f"no quantizable layer named '{layer}'")
        if transform is None:
            self.weight_transforms.pop(layer, None)
        else:
            self.weight_transforms[layer] = transform
        self._compiled.clear()

    def set_drop(self, probability: float, points: Sequence[str] | None = None) -> None:
        """QDrop on the activation quantizers ``points`` (default: all)."""
        for name in points if points is not None else list(self.act_quantizers):
            self.quantizer(name, ACTIVATION).set_drop(probability)

    def reseed(self, seed: int) -> None:
        """Restart the random draws (QDrop) from ``seed``."""
        self.rng.reset_from_seed(int(seed))

    @staticmethod
    def _layer_var(table: dict[str, Any], layer: str, what: str) -> Any:
        if layer not in table:
            raise ConfigError(f"no quantizable layer named '{layer}' with a {what}")
        return table[layer]

    # ------------------------------------------------------------- running
    def function(
        self, outputs: Sequence[str], inputs: Sequence[str] | None = None, raw: Sequence[str] = ()
    ) -> Callable[..., list[Any]]:
        """A compiled TF function ``f(*input_values) -> [output values]`` of a sub-graph.

        ``inputs`` (default: the model input) are fed with their raw values and
        go through their own quantizers; ``outputs`` are returned as their
        readers see them (quantized), except those named in ``raw``, which are
        returned before their activation quantizer.
        """
        inputs = tuple(inputs or (self.input_name,))
        key = (tuple(outputs), inputs, tuple(raw))
        if key not in self._compiled:
            plan = self._plan(list(outputs), set(inputs))

            @tf.function(reduce_retracing=True)
            def run(*values: Any) -> list[Any]:
                return self._forward(plan, dict(zip(inputs, values, strict=True)), key[0], set(raw))

            self._compiled[key] = run
        return self._compiled[key]

    def run(
        self, x: np.ndarray, outputs: Sequence[str] | None = None, batch_size: int = 256, raw: Sequence[str] = ()
    ) -> dict[str, np.ndarray]:
        """The named tensors over ``x`` (model input), computed in batches."""
        outputs = list(outputs or self.graph.output_names)
        fn = self.function(outputs, raw=raw)
        parts: list[list[np.ndarray]] = [[] for _ in outputs]
        x = np.asarray(x, np.float32)
        for start in range(0, len(x), batch_size):
            for i, value in enumerate(fn(tf.constant(x[start : start + batch_size]))):
                parts[i].append(value.numpy())
        return {o: np.concatenate(p, axis=0) for o, p in zip(outputs, parts, strict=True)}

    def _plan(self, outputs: list[str], fed: set[str]) -> list[str]:
        """The nodes to compute, in order: ancestors of ``outputs`` up to the fed nodes."""
        known = set(self.order)
        for name in [*outputs, *fed]:
            if name not in known:
                raise ConfigError(f"no node named '{name}' in the graph")
        needed: set[str] = set()
        stack = list(outputs)
        while stack:
            name = stack.pop()
            if name in needed:
                continue
            needed.add(name)
            if name in fed:
                continue
            if name == self.input_name:
                raise ConfigError(f"the outputs {outputs} need the model input, which is not among the inputs")
            stack.extend(self.inputs[name])
        return [n for n in self.order if n in needed]

    def _forward(self, plan: list[str], fed: dict[str, Any], outputs: Sequence[str], raw: set[str]) -> list[Any]:
        values: dict[str, Any] = {}
        raw_values: dict[str, Any] = {}
        for name in plan:
            if name in fed:
                y = tf.convert_to_tensor(fed[name], tf.float32)
            elif name in self.specs:
                y = self._layer(name, values[self.inputs[name][0]])
            else:
                y = self.functions[name]([values[i] for i in self.inputs[name]])
            raw_values[name] = y
            q = self.act_quantizers.get(name)
            values[name] = y if q is None else q(y)
        return [raw_values[o] if o in raw else values[o] for o in outputs]

    def _layer(self, name: str, x: Any) -> Any:
        """A conv / depthwise / dense layer on ``x`` with its (fake-quantized) kernel and bias."""
        spec = self.specs[name]
        transform = self.weight_transforms.get(name)
        quantizer = self.weight_quantizers[name]
        kernel = quantizer(self.kernels[name]) if transform is None else transform(self.kernels[name], quantizer)
        bias = self.biases.get(name)
        if spec.kind == "dense":
            return run_dense(x, kernel, bias)
        return run_conv(spec, x, kernel, bias)


# ------------------------------------------------------------------ layers
def run_dense(x: Any, kernel: Any, bias: Any) -> Any:
    """x @ W^T + b over the last axis; kernel canonical (out, in). As tf_keras' Dense computes it."""
    k = tf.transpose(kernel)
    rank = len(x.shape)
    y = tf.matmul(x, k) if rank == 2 else tf.tensordot(x, k, [[rank - 1], [0]])
    return y if bias is None else tf.nn.bias_add(y, bias)


def run_conv(spec: LayerSpec, x: Any, kernel: Any, bias: Any) -> Any:
    """A (grouped / depthwise) convolution as TF computes it channels-last; kernel canonical."""
    one_d = spec.spatial_rank == 1
    if not spec.channels_last:
        x = tf.transpose(x, [0, *range(2, len(x.shape)), 1])
    strides, dilations, pads, kernel = spec.strides, spec.dilations, spec.pads, kernel
    if one_d:  # as 2-D with a height of one
        x = tf.expand_dims(x, 1)
        kernel = tf.expand_dims(kernel, 2)
        strides, dilations, pads = (1, *strides), (1, *dilations), ((0, 0), *pads)
    if spec.same_padding:
        padding = "SAME"
    elif any(p for pair in pads for p in pair):
        x = tf.pad(x, [[0, 0], *[list(p) for p in pads], [0, 0]])
        padding = "VALID"
    else:
        padding = "VALID"
    if spec.kind == "depthwise":
        cin = spec.in_channels
        k = tf.transpose(tf.reshape(kernel, [cin, -1, *kernel.shape[2:]]), [2, 3, 0, 1])  # (kh, kw, in, mult)
        y = tf.nn.depthwise_conv2d(x, k, strides=[1, *strides, 1], padding=padding, dilations=list(dilations))
    elif spec.groups == 1:
        k = tf.transpose(kernel, [2, 3, 1, 0])  # (kh, kw, in, out)
        y = tf.nn.convolution(x, k, strides=list(strides), padding=padding, dilations=list(dilations))
    else:
        xs = tf.split(x, spec.groups, axis=-1)
        ks = tf.split(tf.transpose(kernel, [2, 3, 1, 0]), spec.groups, axis=-1)
        y = tf.concat(
            [
                tf.nn.convolution(xi, ki, strides=list(strides), padding=padding, dilations=list(dilations))
                for xi, ki in zip(xs, ks, strict=True)
            ],
            axis=-1,
        )
    if bias is not None:
        y = tf.nn.bias_add(y, bias)
    if one_d:
        y = tf.squeeze(y, 1)
    if not spec.channels_last:
        rank = len(y.shape)
        y = tf.transpose(y, [0, rank - 1, *range(1, rank - 1)])
    return y


def _safe(name: str) -> str:
    """A TF-friendly variable name."""
    return "".join(c if c.isalnum() or c in "_." else "_" for c in name) or "v"

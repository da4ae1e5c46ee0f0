"""The canonical-layout kernel helpers against direct per-channel loops."""

from __future__ import annotations

import numpy as np
import pytest

from tinyptq.kernels import (
    canonical_kernel,
    constant_input_response,
    input_channels,
    input_ranges,
    output_channels,
    output_ranges,
    scale_input_channels,
    scale_output_channels,
)


def _kernel(out: int, inp: int, groups: int, taps: tuple[int, ...] = (3, 3)) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(out, inp // groups, *taps))


def _input_of(o: int, j: int, out: int, inp: int, groups: int) -> int:
    """The input channel that weight (o, j) of a grouped kernel reads."""
    return (o // (out // groups)) * (inp // groups) + j


@pytest.mark.parametrize("out, inp, groups", [(6, 4, 1), (6, 4, 2), (4, 4, 4), (8, 4, 4)])
def test_channel_counts_ranges_and_scaling_follow_the_groups(out, inp, groups):
    k = _kernel(out, inp, groups)
    assert output_channels(k) == out and input_channels(k, groups) == inp
    np.testing.assert_allclose(output_ranges(k), [np.abs(k[o]).max() for o in range(out)])
    want_in = np.zeros(inp)
    s_in = np.arange(1.0, inp + 1)
    scaled = k.copy()
    for o in range(out):
        for j in range(inp // groups):
            i = _input_of(o, j, out, inp, groups)
            want_in[i] = max(want_in[i], np.abs(k[o, j]).max())
            scaled[o, j] *= s_in[i]
    np.testing.assert_allclose(input_ranges(k, groups), want_in)
    np.testing.assert_allclose(scale_input_channels(k, groups, s_in), scaled)
    s_out = np.arange(1.0, out + 1)
    np.testing.assert_allclose(scale_output_channels(k, s_out), k * s_out[:, None, None, None])


@pytest.mark.parametrize("out, inp, groups", [(6, 4, 1), (6, 4, 2), (8, 4, 4)])
def test_constant_input_response_sums_the_taps_of_each_input(out, inp, groups):
    k = _kernel(out, inp, groups)
    c = np.linspace(-1.0, 2.0, inp)
    want = np.zeros(out)
    for o in range(out):
        for j in range(inp // groups):
            want[o] += k[o, j].sum() * c[_input_of(o, j, out, inp, groups)]
    np.testing.assert_allclose(constant_input_response(k, groups, c), want)


def test_dense_kernels_have_no_taps():
    k = np.arange(12.0).reshape(3, 4) - 5
    assert output_channels(k) == 3 and input_channels(k, 1) == 4
    np.testing.assert_allclose(input_ranges(k, 1), np.abs(k).max(axis=0))
    np.testing.assert_allclose(constant_input_response(k, 1, np.ones(4)), k.sum(axis=1))


def test_canonical_kernel_of_a_keras_layer():
    from tests.core.test_graph import tiny_resnet
    from tinyptq.graph.keras_graph import KerasGraph

    graph = KerasGraph.from_keras(tiny_resnet())
    for layer in graph.quant_layers():
        canon = canonical_kernel(graph, layer.name)
        layout = graph.kernel_layout(layer.name)
        assert canon.dtype == np.float64
        np.testing.assert_array_equal(layout.from_canonical(canon, graph.kernel(layer.name).shape),
                                      graph.kernel(layer.name))

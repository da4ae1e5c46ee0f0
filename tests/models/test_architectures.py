"""The MLPerf Tiny architecture builders match the reference models exactly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tinyptq._tf import keras
from tinyptq.errors import ModelError
from tinyptq.models.architectures import (
    ARCHITECTURES,
    dscnn,
    fc_autoencoder,
    load_reference_weights,
    mobilenet_v1_vww,
    resnet8,
)

# architecture name -> (reference file in mlperf-tiny/, input shape without batch)
REFERENCES = {
    "dscnn": ("kws_dscnn_savedmodel", (49, 10, 1)),
    "mobilenet_v1_vww": ("vww_mobilenetv1_96.h5", (96, 96, 3)),
    "resnet8": ("ic_resnet8.h5", (32, 32, 3)),
    "fc_autoencoder": ("ad_autoencoder.h5", (640,)),
}


@pytest.fixture(scope="module")
def reference(mlperf_dir: Path) -> Callable[[str], keras.Model]:
    """Load each reference model at most once per module."""
    cache: dict[str, keras.Model] = {}

    def load(name: str) -> keras.Model:
        if name not in cache:
            path = mlperf_dir / REFERENCES[name][0]
            cache[name] = keras.models.load_model(path, compile=False)
        return cache[name]

    return load


def test_registry_lists_the_four_builders() -> None:
    assert ARCHITECTURES == {
        "dscnn": dscnn,
        "mobilenet_v1_vww": mobilenet_v1_vww,
        "resnet8": resnet8,
        "fc_autoencoder": fc_autoencoder,
    }


@pytest.mark.parametrize(
    ("builder", "expected"),
    [(dscnn, 24_908), (mobilenet_v1_vww, 221_794), (resnet8, 78_666), (fc_autoencoder, 269_992)],
)
def test_parameter_count_matches_reference(
    builder: Callable[[], keras.Model], expected: int
) -> None:
    assert builder().count_params() == expected


def test_dscnn_with_ten_classes() -> None:
    model = dscnn(num_classes=10)
    assert model.output_shape == (None, 10)
    assert model.count_params() == 24_908 - (64 * 12 + 12) + (64 * 10 + 10)  # only the head shrinks


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_reference_weights_give_identical_outputs(
    name: str, reference: Callable[[str], keras.Model]
) -> None:
    ref = reference(name)
    model = ARCHITECTURES[name]()
    x = np.random.default_rng(0).standard_normal((4, *REFERENCES[name][1])).astype(np.float32)
    before = model(x, training=False).numpy()
    expected = ref(x, training=False).numpy()
    assert not np.allclose(before, expected, atol=1e-5)  # fresh weights really differ

    load_reference_weights(model, ref)

    got = model(x, training=False).numpy()
    assert got.shape == expected.shape == (4, ref.output_shape[-1])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_mismatched_reference_raises_model_error(reference: Callable[[str], keras.Model]) -> None:
    model = dscnn()
    first = model.layers[1]  # the first Conv2D, which cannot take ResNet-8's 3x3x3x16 kernel
    original = [w.copy() for w in first.get_weights()]

    with pytest.raises(ModelError, match=f"'{first.name}'") as info:
        load_reference_weights(model, reference("resnet8"))

    assert "\n" not in str(info.value)
    for kept, now in zip(original, first.get_weights(), strict=True):
        np.testing.assert_array_equal(kept, now)  # nothing was copied


def test_layer_count_mismatch_raises_model_error(reference: Callable[[str], keras.Model]) -> None:
    ref = reference("fc_autoencoder")
    truncated = keras.Model(ref.input, ref.layers[-4].output)  # ends at dense_8: 17 weighted layers
    with pytest.raises(ModelError, match="19 weighted layers but the reference has 17"):
        load_reference_weights(fc_autoencoder(), truncated)

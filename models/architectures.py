"""Keras (tf_keras) functional builders for the four MLPerf Tiny reference architectures.

Each builder reproduces the reference model's layer graph exactly (layer types,
kernel sizes, strides, padding and the order of weighted layers), so that
:func:`load_reference_weights` can copy the published weights into it.
Every convolution or dense layer uses a bias and is followed by a separate
``BatchNormalization`` and ``Activation('relu')``, as in the reference files.
"""

from __future__ import annotations

from collections.abc import Callable

from tinyptq._tf import keras
from tinyptq.errors import ModelError

layers = keras.layers

#: L2 weight decay on (non-depthwise) convolution kernels, as in the reference training.
CONV_WEIGHT_DECAY = 1e-4


def _conv(x, filters: int, kernel: int | tuple[int, int], strides: int = 1):
    """Conv2D ('same' padding, with bias and L2 kernel decay), no activation."""
    return layers.Conv2D(
        filters,
        kernel,
        strides=strides,
        padding="same",
        kernel_regularizer=keras.regularizers.l2(CONV_WEIGHT_DECAY),
    )(x)


def _bn_relu(x):
    """BatchNormalization followed by a separate ReLU Activation layer."""
    x = layers.BatchNormalization()(x)
    return layers.Activation("relu")(x)


def _depthwise_separable(x, filters: int, strides: int = 1):
    """Depthwise 3x3 conv + BN + ReLU, then pointwise 1x1 conv + BN + ReLU."""
    x = layers.DepthwiseConv2D(3, strides=strides, padding="same")(x)
    x = _bn_relu(x)
    x = _conv(x, filters, 1)
    return _bn_relu(x)


def _global_avg_pool_classifier(x, num_classes: int):
    """AveragePooling2D over the whole feature map, Flatten, softmax Dense."""
    x = layers.AveragePooling2D(pool_size=(int(x.shape[1]), int(x.shape[2])))(x)
    x = layers.Flatten()(x)
    return layers.Dense(num_classes, activation="softmax")(x)


def dscnn(input_shape: tuple[int, ...] = (49, 10, 1), num_classes: int = 12) -> keras.Model:
    """Build the DS-CNN keyword-spotting model (24,908 parameters at 12 classes)."""
    inputs = keras.Input(shape=input_shape)
    x = _conv(inputs, 64, (10, 4), strides=2)
    x = _bn_relu(x)
    x = layers.Dropout(0.2)(x)
    for _ in range(4):
        x = _depthwise_separable(x, 64)
    x = layers.Dropout(0.4)(x)
    outputs = _global_avg_pool_classifier(x, num_classes)
    return keras.Model(inputs, outputs, name="dscnn")


# (pointwise filters, depthwise stride) of the 13 MobileNetV1 blocks at width 0.25.
_MOBILENET_V1_025_BLOCKS = (
    (16, 1),
    (32, 2),
    (32, 1),
    (64, 2),
    (64, 1),
    (128, 2),
    (128, 1),
    (128, 1),
    (128, 1),
    (128, 1),
    (128, 1),
    (256, 2),
    (256, 1),
)


def mobilenet_v1_vww(
    input_shape: tuple[int, ...] = (96, 96, 3), num_classes: int = 2
) -> keras.Model:
    """Build MobileNetV1 (width 0.25) for visual wake words (221,794 parameters)."""
    inputs = keras.Input(shape=input_shape)
    x = _conv(inputs, 8, 3, strides=2)
    x = _bn_relu(x)
    for filters, strides in _MOBILENET_V1_025_BLOCKS:
        x = _depthwise_separable(x, filters, strides)
    outputs = _global_avg_pool_classifier(x, num_classes)
    return keras.Model(inputs, outputs, name="mobilenet_v1_vww")


def _residual_block(x, filters: int, strides: int):
    """Two 3x3 convs with a skip: identity, or a 1x1 strided conv when the shape changes."""
    y = _conv(x, filters, 3, strides=strides)
    y = _bn_relu(y)
    y = _conv(y, filters, 3)
    shortcut = x if strides == 1 else _conv(x, filters, 1, strides=strides)
    y = layers.BatchNormalization()(y)
    x = layers.Add()([shortcut, y])
    return layers.Activation("relu")(x)


def resnet8(input_shape: tuple[int, ...] = (32, 32, 3), num_classes: int = 10) -> keras.Model:
    """Build the ResNet-8 CIFAR-10 model (78,666 parameters)."""
    inputs = keras.Input(shape=input_shape)
    x = _conv(inputs, 16, 3)
    x = _bn_relu(x)
    x = _residual_block(x, 16, 1)
    x = _residual_block(x, 32, 2)
    x = _residual_block(x, 64, 2)
    outputs = _global_avg_pool_classifier(x, num_classes)
    return keras.Model(inputs, outputs, name="resnet8")


def fc_autoencoder(input_dim: int = 640) -> keras.Model:
    """Build the fully connected anomaly-detection autoencoder (269,992 parameters at 640)."""
    inputs = keras.Input(shape=(input_dim,))
    x = inputs
    for units in (128, 128, 128, 128, 8, 128, 128, 128, 128):
        x = layers.Dense(units)(x)
        x = _bn_relu(x)
    outputs = layers.Dense(input_dim)(x)
    return keras.Model(inputs, outputs, name="fc_autoencoder")


ARCHITECTURES: dict[str, Callable[..., keras.Model]] = {
    "dscnn": dscnn,
    "mobilenet_v1_vww": mobilenet_v1_vww,
    "resnet8": resnet8,
    "fc_autoencoder": fc_autoencoder,
}


def _weighted_layers(model: keras.Model) -> list:
    """Leaf layers that own weights, in ``model.layers`` order (nested models expanded)."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(_weighted_layers(layer))
        elif layer.weights:
            found.append(layer)
    return found


def _describe(layer) -> str:
    """One-line description of a layer: name, class and weight shapes."""
    shapes = [tuple(int(d) for d in w.shape) for w in layer.weights]
    return f"'{layer.name}' ({type(layer).__name__}, shapes {shapes})"


def load_reference_weights(model: keras.Model, reference_model: keras.Model) -> None:
    """Copy a reference model's weights into ``model``, weighted layer by weighted layer."""
    targets = _weighted_layers(model)
    sources = _weighted_layers(reference_model)
    for index, (target, source) in enumerate(zip(targets, sources, strict=False)):
        same_type = type(target).__name__ == type(source).__name__
        target_shapes = [tuple(w.shape) for w in target.weights]
        source_shapes = [tuple(w.shape) for w in source.weights]
        if not same_type or target_shapes != source_shapes:
            raise ModelError(
                f"reference weights do not fit weighted layer #{index} {_describe(target)}: "
                f"reference layer is {_describe(source)}"
            )
    if len(targets) != len(sources):
        index = min(len(targets), len(sources))
        extra = targets[index] if len(targets) > index else sources[index]
        owner = "model" if len(targets) > index else "reference model"
        raise ModelError(
            f"model has {len(targets)} weighted layers but the reference has {len(sources)}; "
            f"first unmatched layer in the {owner} is #{index} {_describe(extra)}"
        )
    for target, source in zip(targets, sources, strict=True):
        target.set_weights(source.get_weights())

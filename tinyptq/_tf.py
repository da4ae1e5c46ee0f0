"""Import TensorFlow with Keras 2 (tf_keras): tfmot and our graph rewriting need it.

Every module that touches TF imports it from here so the environment variable is
always set before TensorFlow is first imported. TensorFlow's C++ start-up
chatter (CUDA probing on machines without a GPU) is written straight to file
descriptor 2; it is muted while TF loads so that tinyptq's own messages stay
readable. Set TINYPTQ_TF_VERBOSE=1 to see it.
"""

from __future__ import annotations

import contextlib
import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def _muted_stderr():
    if os.environ.get("TINYPTQ_TF_VERBOSE"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


with _muted_stderr():
    import tensorflow as tf
    import tf_keras as keras

    tf.config.list_physical_devices()  # device probing happens here, muted

tf.get_logger().setLevel("ERROR")

__all__ = ["tf", "keras"]

"""tinyptq: low-bit post-training quantization simulator for tinyML models."""

from __future__ import annotations

import os

# tfmot and the graph adapter need Keras 2; this must precede any TF import.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tinyptq.errors import ConfigError, DataError, ModelError, TinyPTQError  # noqa: E402

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "ModelError", "TinyPTQError", "__version__"]

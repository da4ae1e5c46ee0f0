"""What a Keras model file declares, read without deserializing it.

Keras rebuilds a model by running its layers' code: a Lambda layer's Python
bytecode stored in the file, a custom layer's class (or a SavedModel's traced
functions), a module named in a .keras config (imported). That happens inside
``load_model``, before tinyptq could reject the layer as unsupported. So the
file's model config is read first, as plain data (h5: the ``model_config``
attribute; .keras: ``config.json`` in the zip; SavedModel: the Keras metadata),
and a model is loaded only when every layer is one the Keras adapter reads and
every module it names is Keras's own.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinyptq.errors import ModelError, first_line
from tinyptq.graph.keras_topology import SUPPORTED

MODEL_CLASSES = frozenset({"Functional", "Model", "Sequential"})
# SavedModel metadata identifiers of Keras objects that are not layers
_NOT_LAYERS = frozenset({"_tf_keras_metric"})
_KERAS_MODULES = ("keras", "tf_keras")


@dataclass
class DeclaredModel:
    """The classes a model file declares: the model's, each layer's, every module named."""

    model_class: str
    model_name: str
    layers: list[tuple[str, str]]  # (layer name, class name)
    modules: list[str]


def _cannot_load(path: Path, exc: BaseException | str) -> ModelError:
    reason = exc if isinstance(exc, str) else first_line(exc, 160)
    return ModelError(f"cannot load model {path}: {reason}")


def _walk(obj: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) of every mapping nested in ``obj``."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                yield key, value
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def _from_config(config: Any, path: Path) -> DeclaredModel:
    """The declared classes of a model config ({"class_name": ..., "config": {"layers": [...]}})."""
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        raise _cannot_load(path, "its model config is not a Keras model config")
    body = config["config"]
    layers = []
    for entry in body.get("layers") or []:
        if not isinstance(entry, dict):
            raise _cannot_load(path, "its model config has a malformed layer entry")
        cfg = entry.get("config") if isinstance(entry.get("config"), dict) else {}
        layers.append((str(entry.get("name") or cfg.get("name") or "?"), str(entry.get("class_name"))))
    modules = [str(v) for k, v in _walk(config) if k == "module" and v is not None]
    return DeclaredModel(str(config.get("class_name")), str(body.get("name") or path.stem), layers, modules)


def _h5_config(path: Path) -> Any:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
    except Exception as exc:  # h5py raises OSError, KeyError, ... for damaged files
        raise _cannot_load(path, exc) from None
    if raw is None:
        raise _cannot_load(path, "the file holds no model config (weights only?)")
    return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)


def _zip_config(path: Path) -> Any:
    try:
        with zipfile.ZipFile(path) as z:
            return z.read("config.json").decode("utf-8")
    except KeyError:
        raise _cannot_load(path, "the .keras archive has no config.json") from None
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError) as exc:
        raise _cannot_load(path, exc) from None


def _savedmodel_nodes(path: Path) -> list[tuple[str, str]]:
    """(identifier, metadata JSON) of the Keras objects of a SavedModel folder."""
    from tinyptq._tf import tf  # noqa: F401  (the protobuf modules come with TF)

    try:
        metadata = path / "keras_metadata.pb"
        if metadata.is_file():
            from tf_keras.protobuf import saved_metadata_pb2

            proto = saved_metadata_pb2.SavedMetadata()
            proto.ParseFromString(metadata.read_bytes())
            # node 0 is the root object: the model
            return [(n.identifier, n.metadata) for n in sorted(proto.nodes, key=lambda n: n.node_id)]
        # older Keras wrote the same metadata into saved_model.pb's object graph
        from tensorflow.core.protobuf import saved_model_pb2

        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString((path / "saved_model.pb").read_bytes())
    except Exception as exc:  # protobuf DecodeError, OSError
        raise _cannot_load(path, exc) from None
    nodes = []
    for graph in proto.meta_graphs[:1]:
        for node in graph.object_graph_def.nodes:
            if node.WhichOneof("kind") == "user_object" and node.user_object.identifier.startswith("_tf_keras"):
                nodes.append((node.user_object.identifier, node.user_object.metadata))
    return nodes


def _from_savedmodel(path: Path) -> DeclaredModel:
    nodes = _savedmodel_nodes(path)
    if not nodes:
        raise ModelError(f"cannot load model {path}: a SavedModel without Keras metadata (tinyptq reads Keras models)")
    declared = []
    for identifier, text in nodes:
        if identifier in _NOT_LAYERS:
            continue
        try:
            meta = json.loads(text)
        except ValueError as exc:
            raise _cannot_load(path, exc) from None
        if not isinstance(meta, dict):
            raise _cannot_load(path, "malformed Keras metadata")
        declared.append((str(meta.get("name") or "?"), str(meta.get("class_name")), meta))
    (root_name, root_class, _), *layers = declared
    modules = [str(v) for _, _, meta in declared for k, v in _walk(meta) if k == "module" and v is not None]
    return DeclaredModel(root_class, root_name, [(n, c) for n, c, _ in layers], modules)


def declared_model(path: str | Path) -> DeclaredModel:
    """The classes the model file at ``path`` declares, read as data (nothing is deserialized)."""
    path = Path(path)
    if path.is_dir():
        return _from_savedmodel(path)
    if path.suffix.lower() == ".keras" and zipfile.is_zipfile(path):
        text = _zip_config(path)
    else:
        text = _h5_config(path)
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise _cannot_load(path, exc) from None
    return _from_config(config, path)


def _keras_module(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in _KERAS_MODULES)


def _refusal(cls: str) -> str:
    """Why a layer class is refused before loading, when the reason is the code it would run."""
    from tinyptq._tf import keras

    if cls == "Lambda":
        return ", not loaded: a Lambda layer runs Python code stored in the file"
    if not hasattr(keras.layers, cls):
        return ", not loaded: a custom layer runs code when it is loaded"
    return ""


def check_model_file(path: str | Path) -> DeclaredModel:
    """Refuse, in one line naming the layer, a file whose loading would run code from it.

    The layers must all be ones the Keras adapter reads (so Lambda and custom
    layers are refused before Keras builds them), the model functional or
    sequential, and every module named in the config one of Keras's own.
    """
    path = Path(path)
    declared = declared_model(path)
    if declared.model_class not in MODEL_CLASSES:
        raise ModelError(
            f"model '{declared.model_name}' in {path} is a {declared.model_class}, not a functional or "
            "sequential Keras model; save it as a functional model (not loaded: its class would run code)"
        )
    for name, cls in declared.layers:
        if cls not in SUPPORTED:
            raise ModelError(
                f"unsupported layer '{name}' ({cls}) in {path}{_refusal(cls)}; supported: "
                + ", ".join(sorted(SUPPORTED))
            )
    for module in declared.modules:
        if not _keras_module(module):
            raise ModelError(
                f"model {path} names the Python module '{module}'; not loaded, since loading would import it"
            )
    return declared

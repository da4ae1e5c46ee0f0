"""INT4 kernels in a .tflite: the kernels of 2- to 4-bit layers packed two values a byte.

The TFLite schema's TensorType INT4 holds signed 4-bit values densely packed:
element ``2i`` in the low nibble of byte ``i``, element ``2i + 1`` in its high
nibble, an odd count leaving the last high nibble 0. This is the order of
``tensor_utils::UnpackDenseInt4IntoInt8``, with which TFLite Micro unpacks
INT4 filters into an int8 scratch buffer before CONV_2D, DEPTHWISE_CONV_2D and
FULLY_CONNECTED. TFLite Micro's FULLY_CONNECTED takes INT4 filters per tensor
only, so a per-channel FULLY_CONNECTED kernel stays INT8 (tinyptq runs
per-channel dense layers as 1x1 CONV_2D anyway). Ops with an INT4 kernel get
the operator version TFLite's op_version.cc gives int8 x int4 (7 for the
convolutions, 10 for FULLY_CONNECTED).

Packing is a pass over the flatbuffer that ``tflite._pin_weights`` wrote: the
int8 integers there are already on the layer's 2..4-bit grid, and their
scales, zero points and int32 biases stay as they are.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from tinyptq.errors import ModelError

INT4_BITS = 4  # weight encodings of at most this many bits are packed
INT4_MIN, INT4_MAX = -8, 7
INT4_OP_VERSIONS = {"CONV_2D": 7, "DEPTHWISE_CONV_2D": 7, "FULLY_CONNECTED": 10}


def pack_int4(values: Any) -> np.ndarray:
    """Signed integers in [-8, 7] packed two a byte, low nibble first (uint8, ceil(n / 2) bytes)."""
    v = np.asarray(values).reshape(-1)
    if v.size and (v.min() < INT4_MIN or v.max() > INT4_MAX):
        raise ValueError(f"INT4 values must lie in [{INT4_MIN}, {INT4_MAX}], got [{v.min()}, {v.max()}]")
    nibbles = (v.astype(np.int64) & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: Any, count: int) -> np.ndarray:
    """The first ``count`` signed values (int8) of INT4 bytes packed low nibble first."""
    if isinstance(packed, (bytes, bytearray)):
        raw = np.frombuffer(packed, np.uint8)
    else:
        raw = np.asarray(packed).astype(np.uint8).reshape(-1)
    if raw.size != (count + 1) // 2:
        raise ValueError(f"{count} INT4 values take {(count + 1) // 2} bytes, not {raw.size}")
    nibbles = np.empty(2 * raw.size, np.int16)
    nibbles[0::2] = raw & 0xF
    nibbles[1::2] = raw >> 4
    return ((nibbles[:count] ^ 8) - 8).astype(np.int8)  # sign-extend bit 3


def pack_int4_kernels(data: bytes, state: Any) -> bytes:
    """``data`` with the kernels of the state's 2..4-bit layers as INT4 tensors.

    Returned unchanged (the same bytes) when no layer has 4 bits or fewer.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    from tinyptq.export.tflite import KERNEL_OPS, _op_name, owner

    low = {name for name, enc in state.weight_encodings.items() if enc.bits <= INT4_BITS}
    if not low:
        return data
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    users = Counter(t.buffer for sg in model.subgraphs for t in sg.tensors)
    graph = model.subgraphs[0]
    packed = []
    for op in graph.operators:
        op_name = _op_name(model, op)
        if op_name not in KERNEL_OPS:
            continue
        tensor = graph.tensors[op.inputs[1]]
        if owner(tensor.name.decode()) in low and _int4_runs(op_name, tensor):
            _pack_tensor(model, tensor, users[tensor.buffer])
            packed.append((op, INT4_OP_VERSIONS[op_name]))
    _raise_op_versions(model, packed)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _int4_runs(op_name: str, tensor: Any) -> bool:
    """Whether TFLite Micro runs this kernel as INT4 (no per-channel FULLY_CONNECTED)."""
    return not (op_name == "FULLY_CONNECTED" and len(tensor.quantization.scale) > 1)


def _raise_op_versions(model: Any, packed: list[tuple[Any, int]]) -> None:
    """Give each op of ``packed`` an operator code of at least its version.

    A code that only packed ops use is raised in place; one shared with other
    ops stays, and the packed ops move to a copy with the new version.
    """
    users = Counter(op.opcodeIndex for sg in model.subgraphs for op in sg.operators)
    packed_users = Counter(op.opcodeIndex for op, _ in packed)
    for op, version in packed:
        index = op.opcodeIndex
        code = model.operatorCodes[index]
        if code.version >= version:
            continue
        if packed_users[index] == users[index]:
            code.version = version
        else:
            op.opcodeIndex = _code_index(model, code, version)


def _code_index(model: Any, code: Any, version: int) -> int:
    """Index of the operator code like ``code`` with ``version`` (appended if missing)."""
    key = (code.builtinCode, code.deprecatedBuiltinCode, code.customCode, version)
    for i, c in enumerate(model.operatorCodes):
        if (c.builtinCode, c.deprecatedBuiltinCode, c.customCode, c.version) == key:
            return i
    new = copy.copy(code)
    new.version = version
    model.operatorCodes.append(new)
    return len(model.operatorCodes) - 1


def _pack_tensor(model: Any, tensor: Any, users: int) -> None:
    from tensorflow.lite.python import schema_py_generated as schema

    name = tensor.name.decode()
    buf = model.buffers[tensor.buffer]
    count = int(np.prod(tensor.shape))
    if tensor.type != schema.TensorType.INT8 or buf.data is None or len(buf.data) != count:
        raise ModelError(f"TFLite export: kernel '{name}' is not a constant int8 tensor")
    if users != 1:
        raise ModelError(f"TFLite export: kernel '{name}' shares its buffer, cannot pack it to INT4")
    values = np.frombuffer(bytes(np.asarray(buf.data, np.uint8)), np.int8)
    try:
        buf.data = pack_int4(values)
    except ValueError as exc:
        raise ModelError(f"TFLite export: kernel '{name}': {exc}") from None
    tensor.type = schema.TensorType.INT4


def read_int4_tensors(model: bytes | str | Path) -> dict[str, np.ndarray]:
    """Every constant INT4 tensor of a .tflite, unpacked from the flatbuffer (name -> int8 array)."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    data = model if isinstance(model, (bytes, bytearray)) else Path(model).read_bytes()
    fb = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    out: dict[str, np.ndarray] = {}
    for sg in fb.subgraphs:
        for t in sg.tensors:
            buf = fb.buffers[t.buffer]
            if t.type != schema.TensorType.INT4 or buf.data is None or len(buf.data) == 0:
                continue
            shape = tuple(int(s) for s in t.shape)
            out[t.name.decode()] = unpack_int4(buf.data, int(np.prod(shape))).reshape(shape)
    return out

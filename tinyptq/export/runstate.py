"""What ``tinyptq quantize --out RUN_DIR`` keeps so that ``tinyptq export RUN_DIR`` can rebuild the state.

``RUN_DIR/state.pkl`` holds the graph as it is after the pipeline (a copy,
without cached framework models), the QuantConfig as plain data, the encodings
as plain data, the fixed (rounded) kernels and the folded batch-norm
statistics. The calibration data is not kept: exporting does not need it.
A pickle runs code when loaded, so the file is signed (tinyptq.signing,
HMAC-SHA256 under the user's key): a state.pkl this user's tinyptq did not
write is refused before anything in it is unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tinyptq import __version__
from tinyptq.config import QuantConfig
from tinyptq.errors import ConfigError, first_line
from tinyptq.quant import Encoding
from tinyptq.signing import SignatureMismatch, SignedFileError, dump_signed, load_signed

STATE_FILE = "state.pkl"
_FORMAT = "tinyptq-state"
_FORMAT_VERSION = 1
CONTEXT = "tinyptq-state"  # what the signature of a state file is bound to


def save_state(state: Any, out_dir: str | Path) -> Path:
    """Write ``out_dir/state.pkl``; return its path."""
    payload = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "tinyptq_version": __version__,
        "graph": state.graph.copy(),
        "config": state.config.to_dict(),
        "weight_encodings": {k: e.to_dict() for k, e in state.weight_encodings.items()},
        "act_encodings": {k: e.to_dict() for k, e in state.act_encodings.items()},
        "fixed_weights": {k: np.asarray(v) for k, v in state.fixed_weights.items()},
        "bn_stats": dict(state.bn_stats),
        "seed": int(state.seed),
    }
    path = Path(out_dir) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return dump_signed(payload, path, CONTEXT)


def load_state(run_dir: str | Path) -> Any:
    """The PTQState saved in ``run_dir`` (no calibration data)."""
    from tinyptq.pipeline import PTQState

    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no {STATE_FILE}: run 'tinyptq quantize --out {run_dir}' first")
    try:
        payload = load_signed(path, CONTEXT)
    except SignatureMismatch:  # planted, copied from another user, damaged, or older than signing
        raise SignatureMismatch(
            f"{STATE_FILE} in {run_dir} was not written by this user's tinyptq (signature mismatch); re-run quantize"
        ) from None
    except SignedFileError as exc:  # signed by us, but its classes moved or changed since
        raise ConfigError(f"{exc}; re-run quantize") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or first_line(exc)}") from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ConfigError(f"{path} is not a tinyptq run state")
    missing = [k for k in _FIELDS if k not in payload]
    if missing:
        raise ConfigError(f"{path} is incomplete (no {', '.join(missing)}): run 'tinyptq quantize' again")
    try:
        return _state(payload, PTQState)
    except Exception as exc:  # fields of the wrong type or shape: KeyError, TypeError, ValueError ...
        raise ConfigError(f"{path} is damaged ({type(exc).__name__}: {first_line(exc, 80)})") from None


_FIELDS = ("graph", "config", "weight_encodings", "act_encodings", "fixed_weights", "bn_stats")


def _state(payload: dict, state_cls: type) -> Any:
    """The PTQState of a loaded payload that has every field."""
    from tinyptq.graph.base import ModelGraph

    graph = payload["graph"]
    if not isinstance(graph, ModelGraph):
        raise TypeError(f"graph is a {type(graph).__name__}")
    calib = np.zeros((0, *[d or 1 for d in graph.input_shape[1:]]), np.float32)
    return state_cls(
        graph=graph,
        config=QuantConfig.from_dict(payload["config"]),
        calib=calib,
        weight_encodings={k: Encoding.from_dict(v) for k, v in payload["weight_encodings"].items()},
        act_encodings={k: Encoding.from_dict(v) for k, v in payload["act_encodings"].items()},
        fixed_weights=dict(payload["fixed_weights"]),
        bn_stats=dict(payload["bn_stats"]),
        seed=int(payload.get("seed", 0)),
    )

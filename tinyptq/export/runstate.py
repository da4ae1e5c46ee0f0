"""What ``tinyptq quantize --out RUN_DIR`` keeps so that ``tinyptq export RUN_DIR`` can rebuild the state.

``RUN_DIR/state.pkl`` holds the graph as it is after the pipeline (a copy,
without cached framework models), the QuantConfig as plain data, the encodings
as plain data, the fixed (rounded) kernels and the folded batch-norm
statistics. The calibration data is not kept: exporting does not need it.
A pickle runs code when loaded: read only run directories you made.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from tinyptq import __version__
from tinyptq.config import QuantConfig
from tinyptq.errors import ConfigError
from tinyptq.quant import Encoding

STATE_FILE = "state.pkl"
_FORMAT = "tinyptq-state"
_FORMAT_VERSION = 1


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
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        pickle.dump(payload, fh, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(path)
    return path


def load_state(run_dir: str | Path) -> Any:
    """The PTQState saved in ``run_dir`` (no calibration data)."""
    from tinyptq.pipeline import PTQState

    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no {STATE_FILE}: run 'tinyptq quantize --out {run_dir}' first")
    try:
        with path.open("rb") as fh:
            payload = pickle.load(fh)
    except Exception as exc:  # unpickling fails in many ways (truncated file, moved classes)
        raise ConfigError(f"cannot read {path}: {type(exc).__name__}") from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ConfigError(f"{path} is not a tinyptq run state")
    graph = payload["graph"]
    calib = np.zeros((0, *[d or 1 for d in graph.input_shape[1:]]), np.float32)
    return PTQState(
        graph=graph,
        config=QuantConfig.from_dict(payload["config"]),
        calib=calib,
        weight_encodings={k: Encoding.from_dict(v) for k, v in payload["weight_encodings"].items()},
        act_encodings={k: Encoding.from_dict(v) for k, v in payload["act_encodings"].items()},
        fixed_weights=dict(payload["fixed_weights"]),
        bn_stats=dict(payload["bn_stats"]),
        seed=int(payload.get("seed", 0)),
    )

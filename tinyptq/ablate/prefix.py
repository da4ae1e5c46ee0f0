"""The key of a stage prefix: what the first k stages of a pipeline compute.

The planner (runner.plan_tasks) compares these keys across tasks to find the
prefixes several tasks share; the worker stores the PTQState after such a
prefix in the disk cache under the same key. One function serves both, so a
prefix the planner calls shared is a prefix the workers find in the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tinyptq.cache import content_hash
from tinyptq.pipeline import Stage
from tinyptq.pipeline_file import PipelineSpec


def uses_quant_config(stages: Sequence[Stage]) -> bool:
    """Whether the state after ``stages`` depends on the quantization settings.

    Then the prefix key covers the settings and a cached state keeps the config
    its stages left; otherwise (e.g. bn_folding + cle) the state is shared
    across bit-widths and each run applies its own config.
    """
    return any(s.uses_quant_config for s in stages)


def prefix_keys(spec: PipelineSpec, scope: Sequence[Any] = ()) -> list[str]:
    """The key of every stage prefix of ``spec``: ``keys[k - 1]`` for the first k stages.

    A key covers the stages with their options, the calibration seed, ``scope``
    (what else the caller must tell apart: the planner passes use case and
    calibration size, the worker's disk cache already hashes in model and
    calibration data) and, when ``uses_quant_config`` of the prefix, the
    quantization settings.
    """
    stages = spec.build()
    quant = spec.quant_config().to_dict()
    seed = int(spec.calibration.get("seed", 0))
    keys = []
    for k in range(1, len(stages) + 1):
        head = stages[:k]
        settings = quant if uses_quant_config(head) else None
        keys.append(content_hash(list(scope), [[s.name, s.get_params()] for s in head], settings, seed))
    return keys

"""The suggested fix: the fewest units that, kept at higher precision, recover a share of the loss.

Each unit (a layer with its output, or a loose activation point) is raised
alone to the fix bit-width (8, or the next candidate above its bits) and the
loss is measured (the ranking); then units are added greedily, each time the
one that lowers the loss most given those already kept (gains interact: a
layer after a destroyed one cannot help until that one is fixed; each step
measures again the six best by their last measurement, and all of them when
none of those helps), until the
loss has shrunk by the requested share or no unit lowers it; finally any
unit whose removal keeps the share is dropped again. The loss is, by default, label-free: the output's noise-to-signal
ratio against FP32 on calibration samples (``select_by="noise"``); with
``select_by="metric"`` it is the FP32 metric minus the quantized one on the
evaluation set (what the report shows, but chosen on the data it is judged
on). Raised tensors get MSE ranges at their new bits (as mixed precision
measures them); ``apply`` reruns the whole pipeline with the override block.
"""

from __future__ import annotations

import glob
from typing import Any

import yaml
from tqdm import tqdm

from tinyptq.analysis.probe import Probe, Unit
from tinyptq.config import LayerOverride, QuantConfig
from tinyptq.cost import CostModel
from tinyptq.errors import ConfigError
from tinyptq.executor import ACTIVATION, WEIGHT
from tinyptq.pipeline import MemoryCache
from tinyptq.quant import Encoding
from tinyptq.sensitivity import candidate_encodings

RETRY = 6  # units measured again at each greedy step (the best by their last measurement)
LADDER = (2, 3, 4, 6, 8)  # the candidate bit-widths "next" climbs (those mixed precision offers)


def target_bits(bits: int, fix_bits: str) -> int | None:
    """The bit-width a tensor at ``bits`` is raised to (None: it is at or above it already)."""
    if fix_bits == "8":
        return 8 if bits < 8 else None
    return next((b for b in LADDER if b > bits), None)


class FixSearch:
    """Greedy forward selection with backward pruning over the probe's units."""

    def __init__(self, probe: Probe, fp32_metric: float, comparable: bool, select_by: str, fix_bits: str) -> None:
        if select_by == "metric" and not comparable:
            raise ConfigError("select_by 'metric' needs a metric the FP32 model shares (use 'noise')")
        self.probe, self.fp32_metric, self.select_by, self.fix_bits = probe, fp32_metric, select_by, fix_bits
        self.raised = self._encodings()
        self.candidates = [u for u in probe.units if self.raised_for(u)]

    def _encodings(self) -> dict[tuple[str, str], Encoding]:
        """MSE-range encodings at the raised bits for every tensor that has some."""
        state = self.probe.state
        wanted: dict[tuple[str, str], int] = {}
        for kind, name in self.probe.all_tensors():
            enc = state.weight_encodings[name] if kind == WEIGHT else state.act_encodings[name]
            bits = target_bits(enc.bits, self.fix_bits)
            if bits is not None:
                wanted[(kind, name)] = bits
        if not wanted:
            return {}
        w_bits = sorted({b for (k, _), b in wanted.items() if k == WEIGHT}) or [8]
        a_bits = sorted({b for (k, _), b in wanted.items() if k == ACTIVATION}) or [8]
        # the pipeline's calibration data (and its statistics, when the state carries a cache)
        weights, acts = candidate_encodings(state.evolve(log=[]), w_bits, a_bits, state.cache or MemoryCache())
        table = {WEIGHT: weights, ACTIVATION: acts}
        return {(k, n): table[k][n][b] for (k, n), b in wanted.items() if b in table[k].get(n, {})}

    def raised_for(self, unit: Unit) -> dict[tuple[str, str], Encoding]:
        """The raised encodings of one unit's tensors."""
        return {t: self.raised[t] for t in unit.tensors if t in self.raised}

    def loss(self, chosen: list[Unit]) -> float:
        """The loss with ``chosen`` raised (everything quantized)."""
        self.probe.all_but(())
        self.probe.raise_bits({t: e for u in chosen for t, e in self.raised_for(u).items()})
        if self.select_by == "noise":
            return self.probe.noise()
        return self.fp32_metric - self.probe.score()["metric"]

    def run(self, share: float, progress: bool = True) -> dict[str, Any]:
        """Rank, add until ``share`` of the loss is recovered, prune; the selection and its trace."""
        base = self.loss([])
        base_metric = self.probe.score()["metric"]
        result: dict[str, Any] = {
            "select_by": self.select_by, "share": share, "fix_bits": self.fix_bits,
            "baseline": {"loss": base, "metric": base_metric}, "ranking": [], "steps": [], "selected": [],
            "recovered": 0.0,
        }
        if base <= 0 or not self.candidates:
            result["reason"] = "no loss to recover" if base <= 0 else "every tensor is at 8 bits or more already"
            return _finish(result, self.probe, [])
        alone = {}
        for unit in tqdm(self.candidates, desc="fix: ranking", disable=not progress, leave=False):
            alone[unit.name] = self.loss([unit])
        ranked = sorted(self.candidates, key=lambda u: (alone[u.name], u.name))
        result["ranking"] = [
            {"unit": u.name, "loss": alone[u.name], "gain": base - alone[u.name]} for u in ranked
        ]
        chosen: list[Unit] = []
        loss, trial = base, alone
        bar = tqdm(desc="fix: adding", disable=not progress, leave=False)
        while (base - loss) / base < share:
            rest = sorted((u for u in ranked if u not in chosen), key=lambda u: (trial[u.name], u.name))
            if chosen:  # the most promising units again, given those kept already: gains interact
                trial = {**trial, **{u.name: self.loss([*chosen, u]) for u in rest[:RETRY]}}
                if min((trial[u.name] for u in rest[:RETRY]), default=loss) >= loss:  # none helps: all of them
                    trial = {**trial, **{u.name: self.loss([*chosen, u]) for u in rest[RETRY:]}}
                else:
                    rest = rest[:RETRY]  # only freshly measured units compete
            best = min(rest, key=lambda u: (trial[u.name], u.name), default=None)
            if best is None or trial[best.name] >= loss:
                break  # no unit lowers the loss further
            chosen.append(best)
            loss = self.loss(chosen)
            result["steps"].append({"unit": best.name, "loss": loss, "recovered": (base - loss) / base,
                                    "metric": self.probe.score()["metric"]})
            bar.update(1)
        bar.close()
        for unit in reversed(list(chosen)):  # the last added first: the weakest
            rest = [u for u in chosen if u is not unit]
            if rest and (base - self.loss(rest)) / base >= share:
                chosen = rest
        final = self.loss(chosen)
        result["recovered"] = (base - final) / base
        result["reached"] = result["recovered"] >= share
        result["selected"] = [u.name for u in chosen]
        result["predicted_metric"] = self.probe.score()["metric"]
        return _finish(result, self.probe, chosen, self)


def _finish(result: dict[str, Any], probe: Probe, chosen: list[Unit], search: FixSearch | None = None) -> dict:
    """Overrides, YAML and cost of the selection; the probe back to the state's encodings."""
    overrides = []
    for unit in chosen:
        bits = {t: e.bits for t, e in search.raised_for(unit).items()} if search else {}
        w = bits.get((WEIGHT, unit.layer)) if unit.layer else None
        a = max((bits[(ACTIVATION, p)] for p in unit.points if (ACTIVATION, p) in bits), default=None)
        overrides.append(LayerOverride(pattern=glob.escape(unit.name), weight_bits=w, act_bits=a))
    probe.raise_bits({})
    probe.all_but(())
    result["overrides"] = [{k: v for k, v in _override_dict(o).items() if v is not None} for o in overrides]
    result.setdefault("predicted_metric", None)
    result["applied"] = None
    result["_overrides"] = overrides
    return result


def _override_dict(o: LayerOverride) -> dict[str, Any]:
    return {"pattern": o.pattern, "weight_bits": o.weight_bits, "act_bits": o.act_bits}


def override_yaml(base: tuple[LayerOverride, ...], extra: list[LayerOverride]) -> str:
    """The pipeline's ``quant.overrides`` with the fix appended, as YAML to paste over the old list."""
    rows = [{k: v for k, v in vars(o).items() if v is not None and not (k == "quantize" and v)} for o in base]
    rows += [{k: v for k, v in _override_dict(o).items() if v is not None} for o in extra]
    return yaml.safe_dump({"quant": {"overrides": rows}}, default_flow_style=None, sort_keys=False)


def fix_cost(graph: Any, config: QuantConfig, extra: list[LayerOverride]) -> dict[str, list[int]]:
    """Weight bytes, peak activation bytes and BOPs before and after the override block."""
    model = CostModel(graph)
    before, after = model.for_config(config), model.for_config(config.replace(overrides=(*config.overrides, *extra)))
    return {k: [int(getattr(before, k)), int(getattr(after, k))] for k in ("weight_bytes", "peak_activation_bytes", "bops")}

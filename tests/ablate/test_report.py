"""The ablation report: paired marginal effects, Pareto fronts, csv / md / html and plots."""

from __future__ import annotations

import base64
import csv
import math
import re

import pytest

from tinyptq.ablate.report import (
    NO_PLOTS,
    marginal_effects,
    pareto_front,
    summarize,
    toggle_values,
    write_report,
)
from tinyptq.ablate.store import ResultStore
from tinyptq.errors import ConfigError

TOGGLES = {"bn_folding": ["off", "on"], "cle": ["off", "on"]}
BITS = {(8, 8): 90.0, (4, 8): 80.0}  # metric of the plain (all off) run per bit setting


def run(wb, ab, toggles, value, seed=0, status="done", error=None, **extra):
    """One store row of the kws use case, per-channel, 256 calibration samples."""
    label = " ".join(f"{k}={v}" for k, v in toggles.items())
    row = {
        "run_id": f"{wb}-{ab}-{label}-{seed}-{status}", "grid": "kws-test", "label": label,
        "use_case": "kws", "weight_bits": wb, "act_bits": ab, "granularity": "per_channel",
        "calib_samples": 256, "seed": seed, "toggles": toggles, "pipeline": [{"range_setting": {}}],
        "metric": "accuracy", "metric_unit": "%", "value": value, "fp32_metric": "accuracy",
        "fp32": 95.0, "delta": None if value is None else value - 95.0, "extras": {},
        "weight_bytes": 2500 * wb, "fp32_weight_bytes": 2500 * 32, "bops": 1e6 * wb * ab,
        "fp32_bops": 1e6 * 32 * 32, "stage_seconds": {"range_setting": 0.1}, "seconds": 1.0,
        "status": status, "error": error,
    }
    row.update(extra)
    return row


def grid_rows():
    """2 x 2 toggle grid x 2 bit settings: bn folding +2, CLE +1, +0.5 when both; 1 failed, 1 skipped."""
    rows = []
    for (wb, ab), base in BITS.items():
        for bn in ("off", "on"):
            for cle in ("off", "on"):
                value = base + 2.0 * (bn == "on") + 1.0 * (cle == "on") + 0.5 * (bn == cle == "on")
                rows.append(run(wb, ab, {"bn_folding": bn, "cle": cle}, value))
    rows.append(run(2, 8, {"bn_folding": "on", "cle": "on"}, None, status="failed",
                    error="RuntimeError: NaN in activation ranges\nTraceback (most recent call last)"))
    rows.append(run(4, 4, {"bn_folding": "off", "cle": "off"}, None, status="skipped",
                    error="act_bits 4 unsupported by the use case"))
    return rows


def make_store(path, rows, toggles=TOGGLES):
    store = ResultStore(path)
    for r in rows:
        store.put(r)
    store.set_meta("grid", {"name": "kws-test", "toggles": toggles})
    store.set_meta("grid_name", "kws-test")
    return store


def effect(effects, toggle, wb, ab, value="on"):
    (e,) = [e for e in effects if (e["toggle"], e["value"], e["weight_bits"], e["act_bits"])
            == (toggle, value, wb, ab)]
    return e


# ------------------------------------------------------------- pure helpers
def test_marginal_effects_are_paired_differences():
    effects = marginal_effects(grid_rows(), TOGGLES)
    assert len(effects) == 4  # 2 toggles x 2 bit settings (failed / skipped runs ignored)
    for wb, ab in BITS:
        bn = effect(effects, "bn_folding", wb, ab)
        # pairs: cle=off (92 - 90 = 2) and cle=on (93.5 - 91 = 2.5)
        assert bn["n"] == 2 and bn["baseline"] == "off"
        assert bn["mean"] == pytest.approx(2.25) and bn["std"] == pytest.approx(math.sqrt(0.125))
        cle = effect(effects, "cle", wb, ab)
        assert cle["n"] == 2 and cle["mean"] == pytest.approx(1.25)


def test_marginal_effects_pair_within_seed_and_report_missing_pairs():
    rows = [
        run(8, 8, {"cle": "off"}, 90.0, seed=0), run(8, 8, {"cle": "on"}, 91.0, seed=0),
        run(8, 8, {"cle": "off"}, 80.0, seed=1), run(8, 8, {"cle": "on"}, 84.0, seed=1),
        run(8, 8, {"cle": "on"}, 99.0, seed=2),  # no partner: not a pair
        run(4, 8, {"cle": "on"}, 70.0),  # no partner at this bit setting at all
        run(4, 8, {"cle": "off"}, math.nan, seed=3),  # NaN never pairs
        run(4, 8, {"cle": "on"}, 71.0, seed=3),
    ]
    effects = marginal_effects(rows, {"cle": ["off", "on"]})
    w8 = effect(effects, "cle", 8, 8)
    assert w8["n"] == 2 and w8["mean"] == pytest.approx(2.5)  # (1 + 4) / 2, not 99 - anything
    w4 = effect(effects, "cle", 4, 8)
    assert w4["n"] == 0 and w4["mean"] is None


def test_option_toggle_values_compare_to_first_listed_value():
    methods = ["minmax", "mse", "percentile"]
    values = [70.0, 75.5, 69.0]
    rows = [run(8, 8, {"range_setting.weights": m}, v) for m, v in zip(methods, values, strict=True)]
    effects = marginal_effects(rows, {"range_setting.weights": methods})
    assert [(e["value"], e["baseline"], e["mean"]) for e in effects] == [
        ("mse", "minmax", pytest.approx(5.5)), ("percentile", "minmax", pytest.approx(-1.0))]


def test_toggle_values_keep_grid_and_label_order_and_add_unseen_values():
    rows = [run(8, 8, {"x": "b", "cle": "on"}, 1.0), run(8, 8, {"x": "a", "cle": "off"}, 1.0)]
    got = toggle_values(rows, {"cle": ["off", "on"], "y": ["q", "p"]})
    assert got == {"cle": ["off", "on"], "y": ["q", "p"], "x": ["a", "b"]}
    assert list(got) == ["x", "cle", "y"]  # label order first ("x=b cle=on"), then the rest


def test_pareto_front_hand_made_example():
    points = [(1, 50), (2, 60), (2, 55), (3, 60), (4, 70), (0.5, 10), (5, math.nan), (4, 70),
              (None, 99), (6, 65)]
    # (2, 55) and (3, 60) lose to (2, 60); (6, 65) to (4, 70); equal points both stay
    assert pareto_front(points) == [0, 1, 4, 5, 7]
    assert pareto_front([]) == []


def test_summarize_averages_over_seeds_with_std():
    rows = [run(8, 8, {"cle": "on"}, v, seed=s) for s, v in enumerate([90.0, 92.0, math.nan])]
    (conf,) = summarize(rows)
    assert conf["mean"] == pytest.approx(91.0) and conf["std"] == pytest.approx(math.sqrt(2))
    assert conf["n"] == 2 and conf["runs"] == 3


# --------------------------------------------------------------- the files
@pytest.fixture(scope="module")
def grid_report(tmp_path_factory):
    """The report of the 2 x 2 x 2 grid (written once for the tests that only read it)."""
    out = tmp_path_factory.mktemp("grid")
    make_store(out, grid_rows())
    return write_report(out)


def test_report_writes_csv_md_html_and_every_plot_kind(grid_report):
    paths = grid_report
    assert {"csv", "md", "html", "plots"} <= set(paths) and all(p.exists() for p in paths.values())

    with open(paths["csv"], newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 10
    header = list(lines[0])
    assert header.index("bn_folding") == header.index("label") + 1 and "cle" in header
    best = [r for r in lines if r["weight_bits"] == "8" and r["label"] == "bn_folding=on cle=on"]
    assert best[0]["bn_folding"] == "on" and float(best[0]["value"]) == 93.5
    assert best[0]["toggles"] == '{"bn_folding": "on", "cle": "on"}'
    failed = [r for r in lines if r["status"] == "failed"][0]
    assert failed["value"] == "" and failed["error"].startswith("RuntimeError")

    md = paths["md"].read_text()
    assert "# Ablation report: kws-test" in md
    assert "10 runs: 8 done, 1 failed, 1 skipped." in md
    assert "| components | W4A8 per-channel | W8A8 per-channel |" in md
    assert "| bn_folding=off cle=off | 80.00 | 90.00 |" in md
    assert "| bn_folding=on cle=on | **83.50** | **93.50** |" in md
    assert "| bn_folding: on vs off | +2.25 ± 0.35 (n=2) | +2.25 ± 0.35 (n=2) |" in md
    assert "| cle: on vs off | +1.25 ± 0.35 (n=2) | +1.25 ± 0.35 (n=2) |" in md
    assert "| failed | kws | W2A8 per-channel | bn_folding=on cle=on | 256 | 0 | " \
           "RuntimeError: NaN in activation ranges |" in md
    assert "act_bits 4 unsupported by the use case" in md
    assert "Traceback" not in md  # only the first line of an error
    assert "](plots/effects_kws-accuracy.png)" in md

    html = paths["html"].read_text()
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', html)
    captions = [c for c, _ in images]
    assert any("vs bit-width" in c for c in captions)
    assert any("marginal effect" in c for c in captions)
    assert any("Pareto" in c for c in captions)
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for _, data in images)
    assert "<td><b>93.50</b></td>" in html
    assert "<script" not in html and not re.search(r"""(src|href)=["']?https?:""", html)  # offline
    pngs = sorted(p.name for p in paths["plots"].glob("*.png"))
    assert pngs == ["bits_kws-accuracy_per-channel.png", "effects_kws-accuracy.png",
                    "pareto_kws-accuracy.png"]
    assert len(images) == len(pngs)


def test_pareto_table_lists_the_best_run_of_each_size(grid_report):
    md = grid_report["md"].read_text()
    front = md.split("### Pareto front")[1].split("![")[0]
    assert "| bn_folding=on cle=on | W4A8 per-channel | 9.8 | 32.0 | 83.50 | size, BOPs |" in front
    assert "| bn_folding=on cle=on | W8A8 per-channel | 19.5 | 64.0 | 93.50 | size, BOPs |" in front
    assert front.count("per-channel") == 2


def test_seeds_are_averaged_in_the_table(tmp_path):
    rows = [run(8, 8, {"cle": c}, v + 10 * s, seed=s)
            for s in (0, 1) for c, v in (("off", 80.0), ("on", 82.0))]
    make_store(tmp_path, rows, {"cle": ["off", "on"]})
    md = write_report(tmp_path)["md"].read_text()
    assert "mean ± std over 2 seeds" in md
    assert "| cle=off | 85.00 ± 7.07 |" in md and "| cle=on | **87.00 ± 7.07** |" in md
    assert "| cle: on vs off | +2.00 ± 0.00 (n=2) |" in md


def test_single_unpaired_run_and_nan_value(tmp_path):
    make_store(tmp_path, [run(8, 8, {"cle": "on"}, 91.0),
                          run(4, 8, {"cle": "on"}, math.nan)], {"cle": ["off", "on"]})
    paths = write_report(tmp_path)
    md = paths["md"].read_text()
    assert "| cle=on | n/a | 91.00 |" in md
    assert "| cle: on vs off | no pair | no pair |" in md
    assert "no marginal effect can be computed" in md
    # no pair, so no heatmap; the other two kinds are still drawn
    assert sorted(p.name.split("_")[0] for p in paths["plots"].glob("*.png")) == ["bits", "pareto"]


@pytest.mark.parametrize("rows", [[], [run(8, 8, {"cle": "on"}, None, status="failed",
                                                 error="ValueError: boom")]])
def test_store_without_done_runs_still_writes_a_report(tmp_path, rows):
    make_store(tmp_path, rows, {"cle": ["off", "on"]})
    paths = write_report(tmp_path)
    assert set(paths) == {"csv", "md", "html"}
    md = paths["md"].read_text()
    counts = "1 run: 0 done, 1 failed, 0 skipped." if rows else "0 runs: 0 done, 0 failed, 0 skipped."
    assert NO_PLOTS in md and counts in md
    html = paths["html"].read_text()
    assert NO_PLOTS in html and "<img" not in html
    with open(paths["csv"], newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    if rows:
        assert "ValueError: boom" in md


def test_rerun_replaces_stale_plots_and_missing_store_is_an_error(tmp_path):
    make_store(tmp_path, [run(8, 8, {"cle": "on"}, 91.0)], {"cle": ["off", "on"]})
    write_report(tmp_path)
    stale = tmp_path / "plots" / "bits_old-accuracy_per-tensor.png"
    stale.write_bytes(b"")
    write_report(tmp_path)
    assert not stale.exists()
    with pytest.raises(ConfigError, match="no results"):
        write_report(tmp_path / "nothing-here")

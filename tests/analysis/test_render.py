"""Rendering of an analysis dict: the three report files, the self-contained HTML, the Markdown."""

from __future__ import annotations

import base64
import copy
import json
import re

import pytest

from tinyptq.analysis import plots, render
from tinyptq.errors import ConfigError

PNG = b"\x89PNG\r\n\x1a\n"
ODD = "add<1>&co"  # a unit / tensor name that needs escaping


def _result(metric: float, sqnr: float | None) -> dict:
    return {"metric": metric, "sqnr_db": sqnr}


def _unit(name: str, kind: str, w: int | None, base: float) -> dict:
    weights = None if w is None else _result(base - 1.0, 20.0)
    return {"name": name, "kind": kind, "weight_bits": w, "act_bits": 4,
            "act_points": [] if w is None else [f"{name}/act"],
            "only_weights": weights, "only_acts": _result(base - 2.0, 15.5),
            "without_weights": None if w is None else _result(base - 8.0, 11.0),
            "without_acts": _result(base - 5.0, None),
            "weight_bytes": None if w is None else 1234, "macs": None if w is None else 442368}


def analysis() -> dict:
    """A small analysis with every key, some None values and a name to escape."""
    return {
        "tinyptq_version": "0.9", "use_case": "ic", "model": "models/ic.h5", "pipeline": "gptq",
        "bits": {"weights": 4, "activations": 4}, "target": "qdq",
        "metric": {"name": "accuracy", "unit": "%", "comparable": True},
        "eval_samples": 466, "calib_samples": 256,
        "seconds": {"pipeline": 40.1, "split": 1.2, "units": 10.3, "tensors": 3.4,
                    "stages": 8.0, "fix": 12.0, "apply": None, "total": 75.0},
        "split": [{"setting": "fp32", "metric": 88.84, "sqnr_db": None},
                  {"setting": "weights only", "metric": 86.1, "sqnr_db": 18.2},
                  {"setting": "activations only", "metric": 80.0, "sqnr_db": 12.1},
                  {"setting": "both", "metric": 78.5, "sqnr_db": 10.9}],
        "units": [_unit("input_1", "point", None, 88.0), _unit("conv2d", "conv", 4, 87.0),
                  _unit(ODD, "point", None, 86.0), _unit("dense", "dense", 4, 88.5)],
        "tensors": {
            "activations": [
                {"name": "input_1", "owner": None, "bits": 4, "range": [0.0, 0.93],
                 "observed": [0.0, 1.0], "clipped": 0.012, "sqnr_db": 21.3,
                 "sqnr_db_network": 21.3},
                {"name": ODD, "owner": None, "bits": 4, "range": [-2.0, 3.0],
                 "observed": [-2.5, 4.0], "clipped": 0.02, "sqnr_db": 9.5,
                 "sqnr_db_network": None}],
            "kernels": [
                {"name": "conv2d", "bits": 4, "per_channel": True, "range": [-0.8, 0.9],
                 "observed": [-1.1, 1.0], "clipped": 0.003, "sqnr_db": 19.0,
                 "worst_channel": 7},
                {"name": "dense", "bits": 4, "per_channel": False, "range": [-0.5, 0.5],
                 "observed": [-0.5, 0.5], "clipped": 0.0, "sqnr_db": None,
                 "worst_channel": None}]},
        "histograms": [
            {"tensor": "conv2d", "kind": "kernel", "channel": 7, "bits": 4,
             "bin_edges": [-1.2 + 0.2 * i for i in range(13)], "counts": [0, 1, 3, 9, 20, 40,
                                                                          38, 19, 8, 2, 1, 0],
             "grid": [-0.8 + 0.1133 * i for i in range(16)], "range": [-0.8, 0.9],
             "sqnr_db": 12.0},
            {"tensor": ODD, "kind": "activation", "channel": None, "bits": 8,
             "bin_edges": [i / 10 for i in range(11)], "counts": [5] * 10,
             "grid": [i / 255 for i in range(256)], "range": [0.0, 1.0], "sqnr_db": None}],
        "stages": {
            "columns": ["as loaded", "bn_folding", "cle", "range_setting", "gptq"],
            "quantized_by": ["reference ranges"] * 3 + ["pipeline"] * 2,
            "layers": [{"layer": "conv2d", "sqnr_db": [12.0, 12.1, 14.2, 14.2, 16.0],
                        "changed": [False, True, True, True, True]},
                       {"layer": "dense", "sqnr_db": [None, None, 20.0, 21.0, 22.5],
                        "changed": [False, False, True, False, True]}]},
        "fix": {
            "select_by": "noise", "share": 0.8, "fix_bits": "8",
            "baseline": {"loss": 0.08, "metric": 78.5},
            "ranking": [{"unit": "input_1", "loss": 0.02, "gain": 0.06},
                        {"unit": "conv2d", "loss": 0.05, "gain": 0.03}],
            "steps": [{"unit": "input_1", "loss": 0.02, "recovered": 0.75, "metric": 84.0},
                      {"unit": "conv2d", "loss": 0.011, "recovered": 0.86, "metric": None}],
            "selected": ["input_1", "conv2d"], "recovered": 0.86,
            "overrides": [{"pattern": "input_1", "act_bits": 8},
                          {"pattern": "conv2d", "weight_bits": 8, "act_bits": 8}],
            "yaml": ("quant:\n  overrides:\n    - {pattern: input_1, act_bits: 8}\n"
                     "    - {pattern: conv2d, weight_bits: 8, act_bits: 8}\n"),
            "cost": {"weight_bytes": [2468, 3084], "peak_activation_bytes": [4096, 8192],
                     "bops": [28311552, 56623104]},
            "predicted_metric": 86.9,
            "applied": {"metric_before": 78.5, "metric_after": 86.2, "seconds": 41.0}},
        "notes": ["the target is tflite: this analysis runs the QDQ simulation"],
    }


def empty_fix(a: dict) -> dict:
    a = copy.deepcopy(a)
    a["fix"] = {"select_by": "noise", "share": None, "fix_bits": None,
                "baseline": {"loss": None, "metric": None}, "ranking": [], "steps": [],
                "selected": [], "reason": "no loss to recover", "recovered": None,
                "overrides": [], "yaml": None, "cost": None, "predicted_metric": None,
                "applied": None}
    return a


def _images(page: str) -> dict[str, bytes]:
    img = r'<img id="plot-([a-z_]+)" alt="[^"]*" src="data:image/png;base64,([^"]+)"'
    found = re.findall(img, page)
    return {pid: base64.b64decode(data, validate=True) for pid, data in found}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, dict]:
    """The full analysis and its empty-fix variant, each written once (the plots are slow)."""
    out = {}
    for name, a in (("full", analysis()), ("empty_fix", empty_fix(analysis()))):
        out[name] = {"analysis": a,
                     "paths": render.write_reports(a, tmp_path_factory.mktemp(name) / "out")}
    return out


@pytest.mark.parametrize("variant", ["full", "empty_fix"])
def test_write_reports_writes_three_files_and_json_round_trips(written, variant):
    a, paths = written[variant]["analysis"], written[variant]["paths"]
    assert set(paths) == {"json", "markdown", "html"}
    assert sorted(p.name for p in paths["json"].parent.iterdir()) == [
        "analysis.html", "analysis.json", "analysis.md"]  # no .tmp left behind
    assert json.loads(paths["json"].read_text()) == a
    assert paths["markdown"].read_text(encoding="utf-8") == render.markdown(a)


def test_write_reports_refuses_nan():
    a = analysis()
    a["split"][1]["metric"] = float("nan")
    with pytest.raises(ValueError):
        render.write_reports(a, "/nonexistent-never-created")


def test_write_error_is_one_line_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot write .*analysis.json"):
        render.write_reports(analysis(), blocker / "out")


@pytest.mark.parametrize("variant", ["full", "empty_fix"])
def test_html_embeds_every_plot_as_png_and_nothing_external(written, variant):
    page = written[variant]["paths"]["html"].read_text(encoding="utf-8")
    images = _images(page)
    assert sorted(images) == sorted(plots.PLOT_IDS)
    for pid in plots.PLOT_IDS:
        assert page.count(f'<img id="plot-{pid}"') == 1
        assert images[pid].startswith(PNG)
    assert "http://" not in page and "https://" not in page
    assert all(s.startswith("data:") for s in re.findall(r'src="([^"]*)"', page))
    assert "<link" not in page and "<script" not in page and "url(" not in page


def test_names_are_escaped(written):
    a = analysis()
    page = written["full"]["paths"]["html"].read_text(encoding="utf-8")
    assert ODD not in page
    assert "add&lt;1&gt;&amp;co" in page
    md = render.markdown(a)
    assert ODD not in md
    assert r"add\<1\>\&co" in md


def test_markdown_holds_yaml_verbatim_and_one_row_per_unit():
    a = analysis()
    md = render.markdown(a)
    assert "```yaml\n" + a["fix"]["yaml"] + "```" in md
    section = md.split("## 2 Per layer")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][2:]
    assert len(rows) == len(a["units"])
    assert [r.split(" | ")[0][2:] for r in rows] == [
        "input_1", "conv2d", r"add\<1\>\&co", "**dense**"]


def test_sections_in_order_and_number_formats(written):
    a = analysis()
    md = render.markdown(a)
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads == ["## 1 Split of the loss", "## 2 Per layer", "## 3 Per tensor",
                     "## 4 Through the pipeline", "## 5 Suggested fix", "## Notes"]
    assert "| fp32 | 88.84% | 0.00% | inf |" in md
    assert "| both | 78.50% | 10.34% | 10.9 |" in md
    assert "| weight bytes | 2,468 | 3,084 | +616 |" in md
    assert "loss of 10.34%" in md
    # worst unit: dense, its activations kept float give 83.5 against 78.5 (conv2d: 82.0)
    assert "Worst unit: dense (dense); keeping its activations in float" in md
    assert "+5.00%" in md
    assert "| 12.0 | 12.1\\* |" in md  # changed cells marked
    assert "**9.5**" in md  # worst activation SQNR
    page = written["full"]["paths"]["html"].read_text(encoding="utf-8")
    assert '<td class="n">∞</td>' in page
    assert "inf" not in page.split("<body>")[1].split("<img")[0]
    assert "applied (pipeline re-run with the overrides, 41 s): 78.50% → 86.20%." in md


def test_empty_fix_renders_a_sentence(written):
    md = written["empty_fix"]["paths"]["markdown"].read_text(encoding="utf-8")
    assert "No fix is suggested: no loss to recover." in md
    assert "```" not in md
    assert "### Steps" not in md
    page = written["empty_fix"]["paths"]["html"].read_text(encoding="utf-8")
    assert "No fix is suggested: no loss to recover." in page


def test_empty_lists_still_give_every_plot():
    a = empty_fix(analysis())
    for key in ("split", "units", "histograms", "notes"):
        a[key] = []
    a["tensors"] = {"activations": [], "kernels": []}
    a["stages"] = {"columns": [], "quantized_by": [], "layers": []}
    figs = plots.figures(a)
    assert sorted(figs) == sorted(plots.PLOT_IDS)
    assert all(png.startswith(PNG) for png in figs.values())
    assert "Notes" in render.markdown(a)


def test_metric_not_comparable_has_no_loss_and_unit_free_numbers():
    a = analysis()
    a["metric"] = {"name": "auc", "unit": "", "comparable": False}
    a["fix"]["applied"] = None
    md = render.markdown(a)
    assert "| setting | auc | output SQNR (dB) |" in md
    assert "Quantized, auc 78.50; FP32: 88.84 (not comparable)." in md
    # with the FP32 model's own metric named, the headline quotes it
    a["metric"].update({"fp32_name": "mean squared error", "fp32": 154.46, "fp32_unit": "dB^2"})
    assert "Quantized, auc 78.50; FP32: mean squared error 154.5 dB^2 (not comparable)." in render.markdown(a)
    assert "predicted auc 86.90; not applied" in md

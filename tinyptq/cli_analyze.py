"""The ``tinyptq analyze`` command (registered on the main group): which layer hurts, and the fix."""

from __future__ import annotations

from pathlib import Path

import click

from tinyptq.analysis import SAMPLES, SHARE
from tinyptq.cli import (
    _calib_filter_option,
    _data_dir_option,
    _eval_filter_option,
    _model_option,
    _use_case_option,
    checked_option,
    cli,
)
from tinyptq.params import CALIB_SAMPLES, SEED
from tinyptq.quant import BITS


@cli.command()
@_use_case_option
@click.option("--pipeline", default="minmax", show_default=True, help="Pipeline YAML file or built-in name.")
@checked_option("--weight-bits", constraint=BITS, default=None, help="Weight bit-width (2-16), overrides the pipeline.")
@checked_option("--act-bits", constraint=BITS, default=None, help="Activation bit-width (2-16), overrides the pipeline.")
@checked_option("--calib-samples", constraint=CALIB_SAMPLES, default=None, help="Number of calibration samples.")
@checked_option("--seed", constraint=SEED, default=None, help="Calibration seed.")
@click.option(
    "--calib-data", type=click.Path(path_type=Path), default=None, help="Calibration inputs (.npy, N x input shape)."
)
@_calib_filter_option
@_eval_filter_option
@checked_option("--share", constraint=SHARE, default=0.8, show_default=True,
                help="Share of the loss the suggested fix must recover (0 < share <= 1).")
@click.option("--fix-bits", type=click.Choice(["8", "next"]), default="8", show_default=True,
              help="Keep the fix's layers at 8 bits, or at the next candidate bit-width (2, 3, 4, 6, 8).")
@click.option("--select-by", type=click.Choice(["noise", "metric"]), default="noise", show_default=True,
              help="Choose the fix by output noise on calibration samples (label-free) or by the metric on the "
              "evaluation set.")
@checked_option("--samples", constraint=SAMPLES, default=128, show_default=True,
                help="Calibration samples for the label-free measures.")
@click.option("--apply", "apply_fix", is_flag=True, help="Rerun the pipeline with the suggested overrides.")
@_model_option
@_data_dir_option
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output directory.")
def analyze(
    use_case: str,
    pipeline: str,
    weight_bits: int | None,
    act_bits: int | None,
    calib_samples: int | None,
    seed: int | None,
    calib_data: Path | None,
    calib_filter: dict[str, str] | None,
    eval_filter: dict[str, str] | None,
    share: float,
    fix_bits: str,
    select_by: str,
    samples: int,
    apply_fix: bool,
    model: Path | None,
    data_dir: Path | None,
    out: Path,
) -> None:
    """Explain a pipeline's loss layer by layer and suggest the layers to keep at higher precision.

    Writes OUT/analysis.json, OUT/analysis.md and OUT/analysis.html (with plots).
    """
    from tinyptq import api
    from tinyptq.paths import check_out_dir

    check_out_dir(out, "--out")  # now, not after the pipeline ran
    a = api.analyze(
        use_case, pipeline, data_dir, model, weight_bits, act_bits, calib_samples, seed, calib_data,
        calib_filter=calib_filter, eval_filter=eval_filter, share=share, fix_bits=fix_bits,
        select_by=select_by, apply=apply_fix, samples=samples, out=out,
    )
    click.echo(headline(a))
    for kind in ("json", "md", "html"):
        click.echo(f"{kind}: {out / ('analysis.' + kind)}")


def headline(a: dict) -> str:
    """Three lines: the loss and its split, the worst unit, the fix."""
    split = {row["setting"]: row for row in a["split"]}
    m = a["metric"]
    unit = m["unit"] if m["unit"] in ("%", "") else f" {m['unit']}"
    head = f"{a['use_case']} W{a['bits']['weights']}A{a['bits']['activations']} [{a['pipeline']}]: "
    parts = f"(weights only {split['weights only']['metric']:.2f}, activations only {split['activations only']['metric']:.2f})"
    if m["comparable"]:
        lines = [f"{head}{m['name']} FP32 {split['fp32']['metric']:.2f} -> {split['both']['metric']:.2f}{unit} {parts}"]
    else:
        lines = [f"{head}{m['fp32_name']} {m['fp32']:.4g} {m['fp32_unit']}; {m['name']} {split['both']['metric']:.2f}"
                 f"{unit} {parts}"]
    fix = a["fix"]
    if not fix["selected"]:
        lines.append(f"fix: none ({fix.get('reason', 'nothing to raise')})")
        return "\n".join(lines)
    cost = fix["cost"]
    extra = cost["weight_bytes"][1] - cost["weight_bytes"][0]
    text = (
        f"fix: keep {', '.join(fix['selected'])} at {'8 bits' if fix['fix_bits'] == '8' else 'the next bit-width'} "
        f"({fix['recovered'] * 100:.0f} % of the {fix['select_by']} loss recovered"
        f"{'' if fix.get('reached', True) else ', short of the ' + format(fix['share'], '.0%') + ' asked'}, "
        f"+{extra:,} weight bytes); "
        f"predicted {fix['predicted_metric']:.2f}{unit}"
    )
    if fix["applied"]:
        text += f"; applied {fix['applied']['metric_before']:.2f} -> {fix['applied']['metric_after']:.2f}{unit}"
    lines.append(text)
    return "\n".join(lines)

"""The ``tinyptq`` command line: eval, quantize, export, train.

User errors (tinyptq's own error type and click's usage errors) become one
line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import click

from tinyptq.config import TARGETS
from tinyptq.errors import TinyPTQError, first_line
from tinyptq.params import CALIB_SAMPLES, SEED, Constraint, Integer, validate
from tinyptq.quant import BITS
from tinyptq.runtimes import RUNTIMES


class CheckedOption(click.Option):
    """A click option whose value is read and checked by a tinyptq.params constraint.

    The text goes to the constraint as is (no click type), so '2.5' for a count
    and '-1' for a seed fail in the same one-line format as a YAML value,
    before the command runs. A default of None means "not given" and is kept.
    """

    def __init__(self, *args: Any, constraint: Constraint, **kwargs: Any) -> None:
        kwargs.setdefault("metavar", constraint.metavar)
        kwargs["type"] = click.STRING  # not inferred from an int default: the constraint reads the text
        super().__init__(*args, **kwargs)
        self.constraint = constraint

    def process_value(self, ctx: click.Context, value: Any) -> Any:
        """The validated value (ConfigError, one line, when it breaks the constraint)."""
        value = super().process_value(ctx, value)
        if value is None:
            return None
        if isinstance(value, str):
            value = self.constraint.from_text(value)
        return validate("command-line", self.opts[0], value, self.constraint)


def checked_option(*decls: str, constraint: Constraint, **kwargs: Any) -> Any:
    """``click.option`` for a value validated by ``constraint``."""
    return click.option(*decls, cls=CheckedOption, constraint=constraint, **kwargs)


_data_dir_option = click.option(
    "--data-dir",
    envvar="TINYPTQ_DATA_DIR",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Data directory (default $TINYPTQ_DATA_DIR, else the user cache).",
)


def _parse_filter_option(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, str] | None:
    """A --*-filter text as a {key: value} dict (ConfigError, one line, on bad syntax); None when not given."""
    if value is None:
        return None
    from tinyptq.models.usecases import parse_filter

    return parse_filter(value, param.opts[0])


def filter_option(*decls: str, help: str) -> Any:
    """``click.option`` for a sample filter (``key=value,...``, e.g. ``speaker=jackson``) read into a dict."""
    return click.option(*decls, default=None, metavar="KEY=VALUE[,...]", callback=_parse_filter_option, help=help)


#: Restrict the use case's calibration samples (personalization: one user's unlabelled samples).
_calib_filter_option = filter_option(
    "--calib-filter",
    help="Calibrate on the use case's samples matching KEY=VALUE pairs only, e.g. speaker=jackson (kws on FSDD).",
)
#: Restrict the use case's evaluation samples the same way.
_eval_filter_option = filter_option(
    "--eval-filter",
    help="Evaluate on the use case's samples matching KEY=VALUE pairs only, e.g. speaker=jackson (kws on FSDD).",
)
_use_case_option = click.option("--use-case", required=True, help="ic, kws, kws-mlperf, vww or ad.")
_model_option = click.option(
    "--model", type=click.Path(path_type=Path), default=None, help="Model file instead of the use case's default."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tinyptq")
def cli() -> None:
    """tinyptq: low-bit post-training quantization simulator for tinyML models."""


@cli.command("eval")
@_use_case_option
@_model_option
@_data_dir_option
@click.option(
    "--runtime",
    type=click.Choice(RUNTIMES),
    default=None,
    help="Run a deployed .tflite (--model) in TFLite Micro (tflm), tf.lite as shipped (tflite) "
    "or its reference kernels (tflite-ref).",
)
def eval_cmd(use_case: str, model: Path | None, data_dir: Path | None, runtime: str | None) -> None:
    """Print the metric of a use case's FP32 model, or of a deployed .tflite in a runtime."""
    from tinyptq import api

    if runtime is None:
        result = api.evaluate(use_case, data_dir, model)
        click.echo(f"{use_case} (FP32 model): {result}")
        return
    if model is None:
        raise click.UsageError("--runtime needs --model (the .tflite file to run)")
    result = api.evaluate_deployed(use_case, model, runtime, data_dir, progress=True)
    click.echo(f"{use_case} ({model.name} in {runtime}): {result}")


@cli.command()
@_use_case_option
@click.option("--pipeline", default="minmax", show_default=True, help="Pipeline YAML file or built-in name.")
@checked_option(
    "--weight-bits", constraint=BITS, default=None, help="Weight bit-width (2-16), overrides the pipeline."
)
@checked_option(
    "--act-bits", constraint=BITS, default=None, help="Activation bit-width (2-16), overrides the pipeline."
)
@checked_option(
    "--calib-samples", constraint=CALIB_SAMPLES, default=None, help="Number of calibration samples (>= 1)."
)
@checked_option("--seed", constraint=SEED, default=None, help="Calibration seed (0 to 2**32 - 1).")
@click.option(
    "--calib-data", type=click.Path(path_type=Path), default=None, help="Calibration inputs (.npy, N x input shape)."
)
@_calib_filter_option
@_eval_filter_option
@click.option(
    "--target",
    type=click.Choice(TARGETS),
    default=None,
    help="Arithmetic of the quantized metric: qdq (float fake quantization), tflite (TFLite Micro's integers) "
    "or onnxruntime (its kernels after its graph optimizations); overrides the pipeline.",
)
@_model_option
@_data_dir_option
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output directory.")
@click.option(
    "--export",
    "export_formats",
    default=None,
    help="Also write deployment files into OUT: any of onnx,tflite,encodings (comma-separated).",
)
def quantize(
    use_case: str,
    pipeline: str,
    weight_bits: int | None,
    act_bits: int | None,
    calib_samples: int | None,
    seed: int | None,
    calib_data: Path | None,
    calib_filter: dict[str, str] | None,
    eval_filter: dict[str, str] | None,
    target: str | None,
    model: Path | None,
    data_dir: Path | None,
    out: Path,
    export_formats: str | None,
) -> None:
    """Run a PTQ pipeline; write OUT/summary.json, OUT/state.pkl and the --export files."""
    from tqdm import tqdm

    from tinyptq import api
    from tinyptq.paths import check_out_dir

    formats = _check_export_request(export_formats, pipeline, weight_bits, act_bits)
    check_out_dir(out, "--out")  # now, not after the pipeline ran
    bars: list = []

    def on_stage(stage, index: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="pipeline", unit="stage", file=sys.stderr, leave=False))
        bars[0].set_postfix_str(stage.name)
        if index:
            bars[0].update(1)

    try:
        result = api.quantize(
            use_case, pipeline, data_dir, model, weight_bits, act_bits, calib_samples, seed, on_stage, calib_data,
            target, calib_filter=calib_filter, eval_filter=eval_filter,
        )
        if bars:
            bars[0].update(bars[0].total - bars[0].n)
    finally:
        for bar in bars:
            bar.close()
    path = api.write_summary(out, result.summary)
    s = result.summary
    target_text = "" if result.state.config.target == "qdq" else f", target {result.state.config.target}"
    head = f"{use_case} W{s['bits']['weights']}A{s['bits']['activations']} [{s['pipeline']['name']}{target_text}]: "
    if s["delta"] is not None:
        result_text = (
            f"{s['metric']}: FP32 {s['fp32']:.2f} -> quantized {s['quantized']:.2f} ({s['delta']:+.2f})"
        )
    else:
        result_text = (
            f"{s['fp32_metric']} {s['fp32']:.4g} {s['fp32_unit']}; "
            f"{s['metric']} {s['quantized']:.4g} {s['metric_unit']}"
        )
    extras = "".join(f"; {k} {v:.4f}" for k, v in s["metric_extras"].items())
    cost = s["cost"]
    click.echo(
        f"{head}{result_text}{extras}; weights {s['weight_bytes']} B (FP32 {s['fp32_weight_bytes']} B), "
        f"peak activations {cost['peak_activation_bytes']} B, {cost['bops'] / 1e6:.1f} MBOPs"
    )
    for rec in s["stage_log"]:
        click.echo(f"  {rec['stage']} ({rec['seconds']:.2f} s): " + "; ".join(rec["lines"]))
    click.echo(f"summary: {path}")
    _save_run_state(result.state, out)
    if formats:
        _export(result.state, out, formats)


def _check_export_request(
    export_formats: str | None, pipeline: str, weight_bits: int | None, act_bits: int | None
) -> list[str]:
    """The --export formats, checked before the pipeline runs (TFLite: 8-bit activations, 2- to 8-bit weights)."""
    if export_formats is None:
        return []
    from tinyptq import api
    from tinyptq.errors import ConfigError
    from tinyptq.export import parse_formats

    formats = parse_formats(export_formats)
    if "tflite" in formats:
        cfg = api.load_pipeline(pipeline).quant_config(weight_bits, act_bits)
        if cfg.act_bits != 8 or cfg.weight_bits > 8:
            raise ConfigError(
                f"TFLite export needs 8-bit activations and 2- to 8-bit weights, not W{cfg.weight_bits}A{cfg.act_bits}"
            )
    return formats


def _save_run_state(state, out: Path) -> None:
    """Keep what 'tinyptq export OUT' needs; a graph that cannot be pickled only costs a warning."""
    import pickle

    from tinyptq.export.runstate import save_state

    try:
        click.echo(f"state: {save_state(state, out)}")
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        click.echo(f"warning: run state not saved ({type(exc).__name__}: {exc}); 'tinyptq export' needs it", err=True)
    except OSError as exc:
        from tinyptq.paths import write_error

        raise write_error(out, exc) from None


def _export(state, out: Path, formats: list[str]) -> None:
    from tinyptq.export import export_state

    for fmt, path in export_state(state, out, formats).items():
        click.echo(f"{fmt}: {path}")


@cli.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "formats", required=True, help="Comma-separated: onnx, tflite, encodings.")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Output directory (default RUN_DIR)."
)
def export_cmd(run_dir: Path, formats: str, out: Path | None) -> None:
    """Write deployment files of a 'tinyptq quantize --out RUN_DIR' run."""
    from tinyptq.export import parse_formats
    from tinyptq.export.runstate import load_state
    from tinyptq.paths import check_out_dir

    chosen = parse_formats(formats)
    target = check_out_dir(out, "--out") if out is not None else run_dir
    _export(load_state(run_dir), target, chosen)  # export_state checks the run directory itself


@cli.command()
@_use_case_option
@_data_dir_option
@checked_option("--seed", constraint=SEED, default=0, show_default=True)
@checked_option("--epochs", constraint=Integer(1, None), default=30, show_default=True)
@click.option("--force", is_flag=True, help="Retrain even if a trained model is cached.")
def train(use_case: str, data_dir: Path | None, seed: int, epochs: int, force: bool) -> None:
    """Train the use case's model (kws: DS-CNN on FSDD) into the cache."""
    from tinyptq.errors import ConfigError

    if use_case != "kws":
        raise ConfigError(f"no training recipe for use case '{use_case}'; trainable: kws")
    from tinyptq.models import training

    if force:
        path = training.train_kws_fsdd(data_dir, seed=seed, epochs=epochs)
    else:
        path = training.kws_fsdd_model(data_dir, seed=seed, epochs=epochs)
    click.echo(f"kws: trained model at {path}")


from tinyptq import cli_ablate, cli_analyze, cli_pareto  # noqa: E402,F401  (register ablate, report, analyze, pareto)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning user errors into one line and an exit code.

    Python warnings raised meanwhile are held back: after a user error only the
    error line is printed; after success they follow the output, one line each.
    """
    with warnings.catch_warnings(record=True) as caught:
        try:
            code = _main(argv)
        except BaseException:  # a bug's traceback: the warnings may explain it
            _echo_warnings(caught)
            raise
    if code == 0:
        _echo_warnings(caught)
    return code


def _echo_warnings(caught: list[warnings.WarningMessage]) -> None:
    seen = set()
    for w in caught:
        text = f"warning: {first_line(w.message)} ({w.category.__name__})"
        if text not in seen:
            seen.add(text)
            click.echo(text, err=True)


def _main(argv: list[str] | None) -> int:
    try:
        cli.main(args=argv, prog_name="tinyptq", standalone_mode=False)
    except TinyPTQError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.UsageError as exc:
        hint = f" (in {exc.ctx.command_path})" if exc.ctx else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    return 0


def console_main() -> None:
    """Console-script wrapper: exit with main()'s code."""
    sys.exit(main())


if __name__ == "__main__":
    # run the imported module, on whose group the other command modules register
    from tinyptq.cli import console_main as _console_main

    _console_main()

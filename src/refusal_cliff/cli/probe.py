"""`refusal-cliff probe train`: the paper's linear refusal prober (stage: `probe.run_probe_train`)."""

from __future__ import annotations

import click

from refusal_cliff.cli.options import (
    check_layers,
    check_out,
    check_prober,
    config_file_option,
    config_options,
    executor_from,
    model_options,
    out_option,
    overwrite_option,
    resolve,
)
from refusal_cliff.compute.prober import check_probe_runs, load_prober
from refusal_cliff.core.config import ExecutorConfig, ModelConfig
from refusal_cliff.core.models import load_model_from
from refusal_cliff.core.runs import read_json
from refusal_cliff.stages.probe import (
    DirectionConfig,
    ProbeConfig,
    check_direction_classes,
    run_probe_direction,
    run_probe_train,
)


@click.group("probe")
def probe_group():
    """Train the linear refusal prober; compute difference-in-means directions beside it."""


@probe_group.command("train")
@model_options
@click.option(
    "--harmful", required=True, help="Generation run folder of HARMFUL prompts (refusals = class 1)."
)
@click.option(
    "--harmless", required=True, help="Generation run folder of HARMLESS prompts (compliance = class 0)."
)
@click.option(
    "--ood", multiple=True, help="Out-of-distribution generation run(s) for OOD accuracy (repeatable)."
)
@config_options(ProbeConfig)
@config_options(ExecutorConfig)
@config_file_option
@out_option
@overwrite_option
def _probe_train_command(harmful, harmless, ood, out, overwrite, config_file, **options):
    """Train the prober on last-token activations; writes OUT/prober.safetensors and OUT/prober.json."""
    config = resolve(ProbeConfig, options)
    model = resolve(ModelConfig, options)
    executor = executor_from(options, model)  # before any loading
    check_probe_runs(harmful, harmless, ood)
    check_layers(config.layer, model)  # negative layers count from the end
    check_out(out)
    loaded = load_model_from(model)
    with executor:
        result = run_probe_train(
            loaded, harmful, harmless, out, config, ood_runs=ood, overwrite=overwrite, executor=executor
        )
    if result.reused:
        click.echo(f"up to date: {result.path} (same inputs and settings)")
        return
    metrics = result.prober.metadata["metrics"]
    ood_text = (
        f", OOD accuracy {metrics['ood_accuracy']:.3f}" if metrics.get("ood_accuracy") is not None else ""
    )
    low, high = metrics["val_accuracy_ci95"]
    click.echo(
        f"wrote {result.path}: layer {result.prober.layer}, validation accuracy {metrics['val_accuracy']:.3f} "
        f"(95 % interval {low:.2f}-{high:.2f}, n={metrics['n_val']}){ood_text}"
    )
    if result.prober.quality == "unreliable":
        click.echo(
            "warning: the prober is UNRELIABLE: " + "; ".join(result.prober.metadata["quality_reasons"]),
            err=True,
        )


@probe_group.command("direction")
@model_options
@click.option(
    "--harmful", required=True, help="Generation run folder of HARMFUL prompts (refusals = class 1)."
)
@click.option(
    "--harmless", required=True, help="Generation run folder of HARMLESS prompts (compliance = class 0)."
)
@click.option(
    "--prober",
    "prober_path",
    default=None,
    type=click.Path(exists=True),
    help="prober.safetensors (or its folder): report each direction's cosine to its weight, and add its "
    "layer.",
)
@config_options(DirectionConfig)
@config_file_option
@out_option
@overwrite_option
def _probe_direction_command(harmful, harmless, prober_path, out, overwrite, config_file, **options):
    """Difference-in-means refusal directions per layer, from the prober's own activations (last token;
    refusals to harmful prompts minus compliance with harmless ones). Writes OUT/directions.safetensors
    and OUT/directions.json (cosine to the prober, standardisation for `trace --direction`)."""
    config = resolve(DirectionConfig, options)
    model = resolve(ModelConfig, options)
    check_direction_classes(harmful, harmless)  # fail before loading the model
    check_layers(config.layers, model)
    if prober_path:
        check_prober(prober_path)
    check_out(out)
    loaded = load_model_from(model)
    prober = load_prober(prober_path, loaded) if prober_path else None
    path = run_probe_direction(loaded, harmful, harmless, out, config, prober=prober, overwrite=overwrite)

    for layer, entry in read_json(path)["layers"].items():
        cosine = (
            ""
            if entry["cosine_to_prober"] is None
            else f", cosine to the prober {entry['cosine_to_prober']:+.3f}"
        )
        click.echo(
            f"layer {layer}: |d| {entry['norm']:.3g}, classes separated {entry['accuracy']:.0%}{cosine}"
        )
    click.echo(f"wrote {path} and {path.with_name('directions.safetensors')}")

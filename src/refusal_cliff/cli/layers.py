"""`refusal-cliff layers`: the layer-wise study, Figure 5 left (stage: `layers.run_layers`)."""

from __future__ import annotations

from pathlib import Path

import click

from refusal_cliff.cli.options import (
    check_layers,
    check_out,
    config_file_option,
    config_options,
    executor_from,
    model_options,
    out_option,
    overwrite_option,
    resolve,
)
from refusal_cliff.compute.prober import check_probe_runs
from refusal_cliff.core.config import ExecutorConfig, ModelConfig
from refusal_cliff.core.models import load_model_from
from refusal_cliff.stages.layers import LayersConfig, run_layers


@click.command("layers")
@model_options
@click.option(
    "--harmful", required=True, help="Generation run folder of HARMFUL prompts (with labels.jsonl)."
)
@click.option(
    "--harmless", required=True, help="Generation run folder of HARMLESS prompts (with labels.jsonl)."
)
@config_options(LayersConfig)
@config_options(ExecutorConfig)
@config_file_option
@out_option
@overwrite_option
def layers_command(harmful, harmless, out, overwrite, config_file, **options):
    """Layer-wise study (Figure 5, left): a prober per layer, every example traced at every layer;
    writes OUT/layer_KK/prober.* and OUT/layerwise.json."""
    config = resolve(LayersConfig, options)
    model = resolve(ModelConfig, options)
    executor = executor_from(options, model)  # before any loading
    check_probe_runs(harmful, harmless)
    check_layers(config.layers, model)
    check_out(out)
    loaded = load_model_from(model)
    with executor:
        probers = run_layers(loaded, harmful, harmless, out, config, overwrite=overwrite, executor=executor)
    for layer, prober in sorted(probers.items()):
        click.echo(
            f"layer {layer:>3}: validation accuracy {prober.metadata['metrics']['val_accuracy']:.3f} "
            f"({prober.quality})"
        )
    click.echo(f"wrote {Path(out) / 'layerwise.json'}")

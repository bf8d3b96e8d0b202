"""`refusal-cliff components`: which components make the cliff (stage: `components.run_components`)."""

from __future__ import annotations

import click

from refusal_cliff.cli.options import (
    check_out,
    check_prober,
    config_file_option,
    config_options,
    model_options,
    out_option,
    overwrite_option,
    resolve,
)
from refusal_cliff.compute.labeling import check_group
from refusal_cliff.compute.prober import load_prober
from refusal_cliff.core.config import ModelConfig
from refusal_cliff.core.models import load_model_from
from refusal_cliff.stages.components import ComponentsConfig, run_components


@click.command("components")
@model_options
@click.option(
    "--prober",
    "prober_path",
    required=True,
    type=click.Path(exists=True),
    help="prober.safetensors (or its folder) written by `probe train` or `layers` (any layer).",
)
@click.option(
    "--generations",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="generations.jsonl of a run on HARMFUL prompts.",
)
@click.option(
    "--labels",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="labels.jsonl of that run (default: the one beside --generations, if it labels every id).",
)
@config_options(ComponentsConfig)
@config_file_option
@out_option
@overwrite_option
def components_command(prober_path, generations, labels, out, overwrite, config_file, **options):
    """Split the prober's logit exactly into every component's term (embeddings, each head, each
    o_proj bias, each MLP) at the last thinking token and every token of the thinking-end template,
    from one forward pass per batch.

    Writes OUT/components.json (every component's term at t_cliff and its change across the end
    template, most negative change first: the components that carry the drop) and
    OUT/components.png (the drop per layer and class, the top components, where each pushes).
    """
    config = resolve(ComponentsConfig, options)
    model = resolve(ModelConfig, options)
    check_group(generations, labels, config.group)  # fail before loading the model (an empty group too)
    check_prober(prober_path)
    check_out(out)
    loaded = load_model_from(model)
    prober = load_prober(prober_path, loaded)
    path = run_components(loaded, prober, generations, out, config, labels=labels, overwrite=overwrite)
    click.echo(f"wrote {path}")
    click.echo(f"wrote {path.with_name('components.png')}")

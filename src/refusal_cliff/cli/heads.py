"""`refusal-cliff heads`: the refusal suppression heads at t_cliff (stage: `heads.run_heads`)."""

from __future__ import annotations

import click

from refusal_cliff.cli.options import (
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
from refusal_cliff.compute.labeling import check_group
from refusal_cliff.compute.prober import load_prober
from refusal_cliff.core.config import ExecutorConfig, ModelConfig
from refusal_cliff.core.models import load_model_from
from refusal_cliff.stages.heads import HeadsConfig, run_heads


@click.command("heads")
@model_options
@click.option(
    "--prober",
    "prober_path",
    required=True,
    type=click.Path(exists=True),
    help="prober.safetensors (or its folder) written by `probe train`.",
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
@config_options(HeadsConfig)
@config_options(ExecutorConfig)
@config_file_option
@out_option
@overwrite_option
def heads_command(prober_path, generations, labels, out, overwrite, config_file, **options):
    """Rank every attention head by its contribution to the refusal logit at t_cliff (the last
    token of the thinking-end template), from one forward pass per batch.

    Writes OUT/heads.json (most negative first: the refusal suppression heads) and OUT/heads.png
    (layers × heads heatmap, red = towards refusal, blue = away from it).
    """
    config = resolve(HeadsConfig, options)
    model = resolve(ModelConfig, options)
    executor = executor_from(options, model)  # before any loading
    check_group(generations, labels, config.group)  # fail before loading the model (an empty group too)
    check_prober(prober_path)
    check_out(out)
    loaded = load_model_from(model)
    prober = load_prober(prober_path, loaded)
    with executor:
        path = run_heads(
            loaded, prober, generations, out, config, labels=labels, overwrite=overwrite, executor=executor
        )
    click.echo(f"wrote {path}")
    click.echo(f"wrote {path.with_name('heads.png')}")

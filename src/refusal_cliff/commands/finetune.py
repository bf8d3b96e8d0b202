"""`refusal-cliff finetune`: safety SFT on a selection (stage: `finetune.run_finetune`)."""

from __future__ import annotations

import click

from ..config import FinetuneConfig, ModelConfig
from .options import (
    check_out,
    config_file_option,
    config_options,
    load_model_from,
    model_options,
    out_option,
    overwrite_option,
    resolve,
)


@click.command("finetune")
@model_options
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="DIR/selection.jsonl from `select` (or a TRL prompt-completion JSONL).",
)
@config_options(FinetuneConfig)
@config_file_option
@out_option
@overwrite_option
def finetune_command(data, out, overwrite, config_file, **options):
    """Safety SFT on a selected set with TRL (full-parameter or LoRA)."""
    from ..finetune import load_sft_examples, run_finetune

    config = resolve(FinetuneConfig, options)
    model = resolve(ModelConfig, options)
    load_sft_examples(data)  # fail before loading the model
    check_out(out)
    loaded = load_model_from(model)
    result = run_finetune(loaded, data, out, config, overwrite=overwrite)
    click.echo(
        f"trained:   {result.metrics['n_examples']} examples, {result.metrics['steps']} steps, "
        f"loss {result.metrics['train_loss']:.4f}"
    )
    click.echo(f"model:     {result.model_dir}")
    if result.adapter_dir:
        click.echo(f"adapter:   {result.adapter_dir}")

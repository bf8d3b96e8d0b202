"""`refusal-cliff finetune`: safety SFT on a selection (stage: `finetune.run_finetune`).

Multi-GPU: `accelerate launch --config_file configs/accelerate_zero2.yaml "$(which refusal-cliff)" finetune
... --deepspeed configs/deepspeed_zero2.json`; every process runs this command, the main one prints.
"""

from __future__ import annotations

import dataclasses
import logging

import click

from refusal_cliff.cli.options import (
    check_out,
    config_file_option,
    config_options,
    model_options,
    out_option,
    overwrite_option,
    resolve,
)
from refusal_cliff.core.config import ModelConfig
from refusal_cliff.core.models import load_model_from
from refusal_cliff.stages.finetune import (
    FinetuneConfig,
    check_deepspeed_config,
    is_main_process,
    load_sft_examples,
    run_finetune,
    training_device,
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
    config = resolve(FinetuneConfig, options)
    model = resolve(ModelConfig, options)
    # every launched process validates before loading the model and before joining the process group
    load_sft_examples(data)
    check_out(out)
    check_deepspeed_config(config.deepspeed)
    model = dataclasses.replace(model, device=training_device(model.device))
    if not is_main_process():  # one process reports; the others only warn
        logging.getLogger("refusal_cliff").setLevel(logging.WARNING)
    loaded = load_model_from(model)
    result = run_finetune(loaded, data, out, config, overwrite=overwrite)
    if not is_main_process():
        return
    click.echo(
        f"trained:   {result.metrics['n_examples']} examples, {result.metrics['steps']} steps, "
        f"loss {result.metrics['train_loss']:.4f}"
    )
    click.echo(f"model:     {result.model_dir}")
    if result.adapter_dir:
        click.echo(f"adapter:   {result.adapter_dir}")

"""`refusal-cliff label`: refusal labels on the answers (stage: `label.run_label`)."""

from __future__ import annotations

import click

from refusal_cliff.cli.options import (
    check_out,
    config_file_option,
    config_options,
    load_judge,
    out_option,
    overwrite_option,
    resolve,
)
from refusal_cliff.compute.labeling import generation_model_id, load_keywords, read_generations
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.models import load_tokenizer
from refusal_cliff.core.runs import estimate_bytes, read_jsonl
from refusal_cliff.stages.label import LabelConfig, run_label


@click.command("label")
@click.option("--generations", required=True, help="generations.jsonl written by `generate`.")
@config_options(LabelConfig)
@config_file_option
@out_option
@overwrite_option
def label_command(generations, out, overwrite, config_file, **options):
    """Label refusals on the answer (first 32 tokens); writes OUT/labels.jsonl."""
    config = resolve(LabelConfig, options)
    records = read_generations(generations, ("id", "prompt", "answer"))  # fail before loading anything
    if config.keywords:
        load_keywords(config.keywords)

    check_out(out, estimate_bytes(len(records), 32, 8))  # before any warning about the tokenizer
    model_id = config.tokenizer or generation_model_id(generations)
    tokenizer = None
    if model_id:
        try:
            tokenizer = load_tokenizer(model_id)
        except UserError as exc:
            click.echo(f"warning: {exc}; counting the answer's first 32 words instead of tokens", err=True)
    else:
        click.echo(
            "warning: no --tokenizer and no metadata.json beside the generations; counting the answer's "
            "first 32 words instead of tokens",
            err=True,
        )
    path = run_label(generations, out, config, tokenizer, load_judge(config.judge), overwrite=overwrite)

    labels = read_jsonl(path)
    click.echo(f"wrote {path}: {sum(label['refusal'] for label in labels)}/{len(labels)} refusals")

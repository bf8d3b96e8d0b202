"""`generate`, `label` and `models`: the foundation verbs."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UserError
from .common import (generation_config_from, generation_options, load_from_options, model_options,
                     out_option, overwrite_option)


@click.command("generate")
@model_options
@click.option("--prompts", required=True, help="Prompt file (.csv/.json/.jsonl/.parquet/.txt), hub dataset id, "
                                               "or demo:harmful / demo:harmless.")
@click.option("--column", default=None, help="Prompt column (detected among prompt, goal, instruction, ...).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use the first N prompts.")
@generation_options
@out_option
@overwrite_option
def generate_command(prompts, column, limit, out, overwrite, **options):
    """Generate thinking and answers; writes OUT/generations.jsonl (resumes if interrupted)."""
    from ..data import load_prompts
    from ..generation import run_generate

    prompt_set = load_prompts(prompts, column=column, limit=limit)
    config = generation_config_from(options)
    loaded = load_from_options(options)
    path = run_generate(loaded, prompt_set, config, out, overwrite=overwrite, source=prompts)
    click.echo(f"wrote {path} ({len(prompt_set)} examples)")


@click.command("label")
@click.option("--generations", required=True,
              help="generations.jsonl written by `generate`.")
@click.option("--keywords", default=None, type=click.Path(dir_okay=False),
              help="Extra refusal keywords, one per line (added to the built-in list).")
@click.option("--only-keywords", is_flag=True, help="Use only the --keywords file, not the built-in list.")
@click.option("--tokenizer", "tokenizer_model", default=None,
              help="Model whose tokenizer counts the 32 answer tokens (default: the generation run's model).")
@click.option("--judge", default=None, help="A LlamaGuard-style judge model (hub id, folder or .gguf).")
@out_option
@overwrite_option
def label_command(generations, keywords, only_keywords, tokenizer_model, judge, out, overwrite):
    """Label refusals on the answer (first 32 tokens); writes OUT/labels.jsonl."""
    from ..labeling import KeywordLabeler, ModelJudge, default_keywords, label_records, load_keywords
    from ..models import load_model, load_tokenizer
    from ..runs import RunFolder, file_digest, read_json, read_jsonl, write_jsonl

    if Path(generations).is_dir():
        raise UserError(f"{generations} is a folder; pass its generations.jsonl")
    if not Path(generations).is_file():
        raise UserError(f"file not found: {generations}")
    records = read_jsonl(generations)
    if not records:
        raise UserError(f"{generations} holds no generations; run `refusal-cliff generate` first")
    missing = [k for k in ("id", "prompt", "answer") if k not in records[0]]
    if missing:
        raise UserError(f"{generations} lacks fields {missing}; is it a generations.jsonl from `generate`?")
    words = [] if only_keywords else default_keywords()
    if keywords:
        words += load_keywords(keywords)
    if not words:
        raise UserError("no keywords: pass --keywords FILE with --only-keywords")
    model_id = tokenizer_model
    if model_id is None:
        meta = Path(generations).with_name("metadata.json")
        model_id = read_json(meta).get("config", {}).get("model") if meta.is_file() else None
    tokenizer = None
    if model_id:
        try:
            tokenizer = load_tokenizer(model_id)
        except UserError as exc:
            click.echo(f"warning: {exc}; counting the answer's first 32 words instead of tokens", err=True)
    else:
        click.echo("warning: no --tokenizer and no metadata.json beside the generations; counting the answer's "
                   "first 32 words instead of tokens", err=True)
    judge_model = ModelJudge(load_model(judge, require_chat_template=True)) if judge else None
    digest = file_digest(generations)
    run = RunFolder(out, "label", {"generations": str(generations), "digest": digest,
                                   "keywords": words, "judge": judge}, overwrite=True)
    previous = run.previous()
    if (run.path("labels.jsonl").exists() and previous and previous.get("config", {}).get("digest") != digest
            and not overwrite):
        raise UserError(f"{run.path('labels.jsonl')} labels other generations; use another --out, "
                        "or pass --overwrite to replace it")
    run.start(model_id=model_id, artifacts=[])
    labels = label_records(records, KeywordLabeler(words), tokenizer, judge_model)
    write_jsonl(run.path("labels.jsonl"), labels)
    refused = sum(label["refusal"] for label in labels)
    run.finish({"n": len(labels), "refusals": refused})
    click.echo(f"wrote {run.path('labels.jsonl')}: {refused}/{len(labels)} refusals")


@click.command("models")
def models_command():
    """List the supported architectures."""
    from ..architectures import supported_architectures

    for name in supported_architectures():
        click.echo(name)

"""`refusal-cliff select`: Cliff-as-a-Judge data selection (stage: `select.run_select`)."""

from __future__ import annotations

import click

from refusal_cliff.cli.options import (
    check_out,
    check_prober,
    config_file_option,
    config_options,
    executor_from,
    load_judge,
    model_options,
    out_option,
    overwrite_option,
    resolve,
)
from refusal_cliff.compute.backends import check_backend
from refusal_cliff.compute.prober import load_prober
from refusal_cliff.core.config import BackendConfig, ExecutorConfig, GenerationConfig, ModelConfig
from refusal_cliff.core.models import load_model_from
from refusal_cliff.core.runs import estimate_bytes
from refusal_cliff.stages.select import ScoreConfig, SelectConfig, load_candidates, resolve_k, run_select


@click.command("select")
@model_options
@click.option(
    "--prober",
    "prober_path",
    required=True,
    type=click.Path(exists=True),
    help="prober.safetensors (or its folder) trained on this model.",
)
@click.option(
    "--candidates",
    required=True,
    help="Candidate file (WildJailbreak-style vanilla/adversarial + completion, or prompt + response; "
    ".jsonl/.json/.csv/.parquet), or demo:candidates.",
)
@config_options(SelectConfig)
@config_options(ScoreConfig)
@config_options(GenerationConfig)
@config_options(BackendConfig)
@config_options(ExecutorConfig)
@config_file_option
@out_option
@overwrite_option
def select_command(prober_path, candidates, out, overwrite, config_file, **options):
    """Score candidates by their refusal cliff and select k of them as SFT data."""
    config = resolve(SelectConfig, options)
    generation = resolve(GenerationConfig, options)
    score = resolve(ScoreConfig, options, generation=generation)
    model = resolve(ModelConfig, options)
    backend = resolve(BackendConfig, options)
    check_backend(backend)
    executor = executor_from(options, model)  # before any loading
    rows = load_candidates(candidates, config.limit)
    resolve_k(config.k, len(rows))  # fail before loading the model
    check_prober(prober_path)

    tokens = generation.max_thinking_tokens + generation.max_answer_tokens
    check_out(out, estimate_bytes(len(rows), tokens, 8))
    loaded = load_model_from(model)
    prober = load_prober(prober_path, loaded)
    with executor:
        result = run_select(
            loaded,
            prober,
            rows,
            out,
            config,
            score,
            judge=load_judge(config.judge, model.device),
            overwrite=overwrite,
            source=candidates,
            backend=backend,
            executor=executor,
        )
    click.echo(f"scored:    {result.n_candidates} candidates -> {result.scores_path}")
    click.echo(f"selected:  {result.n_selected} by {config.method} -> {result.selection_path}")
    for kind, path in result.exports.items():
        click.echo(f"{kind}: {path}")

"""`refusal-cliff generate`: answers with thinking (stage: `generate.run_generate`)."""

from __future__ import annotations

import click

from refusal_cliff.cli.options import (
    check_out,
    check_prompts_fit_before_loading,
    config_file_option,
    config_options,
    model_options,
    out_option,
    overwrite_option,
    resolve,
)
from refusal_cliff.compute.backends import check_backend, load_tokenizer_side
from refusal_cliff.core.config import BackendConfig, GenerationConfig, ModelConfig
from refusal_cliff.core.data import load_prompts
from refusal_cliff.core.models import load_model_from
from refusal_cliff.core.runs import estimate_bytes
from refusal_cliff.stages.generate import run_generate


@click.command("generate")
@model_options
@click.option(
    "--prompts",
    required=True,
    help="Prompt file (.csv/.json/.jsonl/.parquet/.txt), hub dataset id, or demo:harmful / demo:harmless.",
)
@click.option("--column", default=None, help="Prompt column (detected among prompt, goal, instruction, ...).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use the first N prompts.")
@config_options(GenerationConfig)
@config_options(BackendConfig)
@config_file_option
@out_option
@overwrite_option
def generate_command(prompts, column, limit, out, overwrite, config_file, **options):
    """Generate thinking and answers; writes OUT/generations.jsonl (resumes if interrupted)."""
    config = resolve(GenerationConfig, options)
    model = resolve(ModelConfig, options)
    backend = resolve(BackendConfig, options)
    check_backend(backend)  # the extra is there, before anything is loaded
    prompt_set = load_prompts(prompts, column=column, limit=limit)

    check_out(out, estimate_bytes(len(prompt_set), config.max_thinking_tokens + config.max_answer_tokens, 8))
    check_prompts_fit_before_loading(model, [prompt_set], config)
    # with vLLM only the tokenizer is loaded here (the weights are vLLM's): the GPU is the engine's
    loaded = load_tokenizer_side(model) if backend.backend == "vllm" else load_model_from(model)
    path = run_generate(loaded, prompt_set, config, out, overwrite=overwrite, source=prompts, backend=backend)
    click.echo(f"wrote {path} ({len(prompt_set)} examples)")

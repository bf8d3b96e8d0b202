"""`refusal-cliff evaluate`: ASR, over-refusal, final-token score and reasoning accuracy side by side
(stage: `evaluate.run_evaluate`)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from refusal_cliff.cli.options import (
    check_out,
    check_prober,
    config_file_option,
    config_options,
    executor_from,
    load_judge,
    out_option,
    overwrite_option,
    resolve,
)
from refusal_cliff.compute.backends import check_backend
from refusal_cliff.compute.reasoning import prepare_tasks
from refusal_cliff.core.config import BackendConfig, ExecutorConfig, GenerationConfig, ModelConfig
from refusal_cliff.core.data import load_prompts
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.models import load_model
from refusal_cliff.stages.evaluate import EvalConfig, format_table, load_sweep, parse_model_spec, run_evaluate


@click.command("evaluate")
@click.option(
    "--model",
    "models",
    multiple=True,
    help="Model to evaluate, as NAME=PATH or PATH (hub id, folder, .gguf, default); repeat to compare.",
)
@click.option(
    "--sweep",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help='JSON list of {"model": PATH, "method": "cliff", "k": 10}: checkpoints for ASR vs k.',
)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option(
    "--harmful",
    multiple=True,
    help="Harmful prompt set (file, hub id or demo:harmful); repeat for several. ASR per set. "
    "Needed unless --tasks is given.",
)
@click.option("--benign", multiple=True, help="Benign prompt set; over-refusal per set.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="First N prompts of each set, and first N examples of each lm-eval task unless --task-limit.",
)
@click.option(
    "--prober",
    "prober_path",
    type=click.Path(exists=True),
    default=None,
    help="Prober for the final-token refusal score.",
)
@click.option(
    "--judge",
    "judge_model",
    default=None,
    help="LlamaGuard-style judge model (hub id or folder); default: keyword judge.",
)
@config_options(EvalConfig)
@config_options(GenerationConfig)
@config_options(BackendConfig)
@config_options(ExecutorConfig)
@config_file_option
@out_option
@overwrite_option
def evaluate_command(
    models,
    sweep,
    device,
    harmful,
    benign,
    limit,
    prober_path,
    judge_model,
    out,
    overwrite,
    config_file,
    **options,
):
    """Compare models on ASR, over-refusal, final-token refusal score and reasoning tasks (lm-eval)."""
    generation = resolve(GenerationConfig, options)
    config = resolve(EvalConfig, options, generation=generation)
    backend = resolve(BackendConfig, options)
    check_backend(backend)  # the extra is there, before anything is loaded
    # Ray's final-token scores, checked before any loading; its workers load each evaluated model in
    # turn (executor.for_model)
    executor = executor_from(options, ModelConfig())
    if config.task_limit is None and limit is not None:
        config.task_limit = limit
    specs = [parse_model_spec(m) for m in models] + (load_sweep(sweep) if sweep else [])
    if not specs:
        raise UserError("pass --model (repeat to compare) or --sweep FILE")
    if not harmful and not config.tasks:
        raise UserError("pass --harmful FILE (attack success rate) and/or --tasks NAME (reasoning accuracy)")
    check_backend(backend, [spec.source for spec in specs])
    with contextlib.ExitStack() as stack:
        # tasks, task folders and data files are checked before any model (or judge) is loaded
        prepared = (
            stack.enter_context(prepare_tasks(config.tasks, config.task_paths, config.task_limit))
            if config.tasks
            else None
        )
        harmful_sets = {
            Path(h).stem if ":" not in h else h.split(":")[-1]: load_prompts(h, limit=limit) for h in harmful
        }
        benign_sets = {
            Path(b).stem if ":" not in b else b.split(":")[-1]: load_prompts(b, limit=limit) for b in benign
        }
        if prober_path:
            check_prober(prober_path)
        check_out(out)
        stack.enter_context(executor)
        evaluation = run_evaluate(
            specs,
            harmful_sets,
            benign_sets,
            out,
            config,
            prober_path,
            load_judge(judge_model, device),
            load=lambda s: load_model(s, device=device),
            overwrite=overwrite,
            prepared=prepared,
            backend=backend,
            executor=executor,
        )
    click.echo(format_table(evaluation["models"]))
    click.echo(f"evaluation: {Path(out) / 'evaluation.json'}")

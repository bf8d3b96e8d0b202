"""`refusal-cliff evaluate`: ASR, over-refusal, final-token score and reasoning accuracy, side by side."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from .common import (
    generation_config_from,
    generation_options,
    load_from_options,
    model_options,
    out_option,
    overwrite_option,
)

_judge_option = click.option("--judge", "judge_model", default=None,
                             help="LlamaGuard-style judge model (hub id or folder); default: keyword judge.")


def _load_judge(judge_model: str | None, device: str):
    if not judge_model:
        return None
    from ..labeling import ModelJudge
    from ..models import load_model

    return ModelJudge(load_model(judge_model, device=device))


@click.command("evaluate")
@click.option("--model", "models", multiple=True,
              help="Model to evaluate, as NAME=PATH or PATH (hub id, folder, .gguf, default); repeat to compare.")
@click.option("--sweep", type=click.Path(exists=True, dir_okay=False), default=None,
              help='JSON list of {"model": PATH, "method": "cliff", "k": 10}: checkpoints for ASR vs k.')
@click.option("--device", default="auto", show_default=True)
@click.option("--harmful", multiple=True,
              help="Harmful prompt set (file, hub id or demo:harmful); repeat for several. ASR per set. "
                   "Needed unless --tasks is given.")
@click.option("--benign", multiple=True, help="Benign prompt set; over-refusal per set.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="First N prompts of each set, and first N examples of each lm-eval task unless --task-limit.")
@click.option("--prober", "prober_path", type=click.Path(exists=True), default=None,
              help="Prober for the final-token refusal score.")
@click.option("--tasks", default="",
              help="lm-eval tasks or groups, comma-separated: arc_challenge_local,mmlu_pro_local (with --task-path) "
                   "or hub tasks (arc_challenge,mmlu_pro; need the dataset hub). Needs the `eval` extra.")
@click.option("--task-path", "task_paths", multiple=True,
              help="Folder of lm-eval task YAMLs (e.g. ../shared/data/arc_challenge); repeat for several. Relative "
                   "data_files are read relative to each YAML's own folder.")
@click.option("--task-limit", type=click.IntRange(min=1), default=None,
              help="First N examples of each lm-eval task (default: --limit, else all).")
@click.option("--task-max-gen-tokens", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Answer budget of generative lm-eval tasks (MMLU-Pro); the thinking before it has "
                   "--max-thinking-tokens.")
@_judge_option
@generation_options
@out_option
@click.option("--overwrite", is_flag=True, help="Replace an evaluation with other models or settings in --out.")
def evaluate(models: tuple[str, ...], sweep: str | None, device: str, harmful: tuple[str, ...],
             benign: tuple[str, ...], limit: int | None, prober_path: str | None, tasks: str,
             task_paths: tuple[str, ...], task_limit: int | None, task_max_gen_tokens: int,
             judge_model: str | None, out: str, overwrite: bool, **options) -> None:
    """Compare models on ASR, over-refusal, final-token refusal score and reasoning tasks (lm-eval)."""
    from ..data import load_prompts
    from ..errors import UserError
    from ..evaluation import EvalConfig, evaluate_models, format_table, load_sweep, parse_model_spec
    from ..models import load_model
    from ..reasoning import prepare_tasks

    specs = [parse_model_spec(m) for m in models] + (load_sweep(sweep) if sweep else [])
    if not specs:
        raise UserError("pass --model (repeat to compare) or --sweep FILE")
    task_names = tuple(t.strip() for t in tasks.split(",") if t.strip())
    if not harmful and not task_names:
        raise UserError("pass --harmful FILE (attack success rate) and/or --tasks NAME (reasoning accuracy)")
    if task_paths and not task_names:
        raise UserError("--task-path needs --tasks NAME[,NAME...]: the tasks to run from those folders")
    config = EvalConfig(generation=generation_config_from(options), tasks=task_names, task_paths=task_paths,
                        task_limit=task_limit or limit, task_max_gen_tokens=task_max_gen_tokens)
    with contextlib.ExitStack() as stack:
        # tasks, task folders and data files are checked before any model (or judge) is loaded
        prepared = (stack.enter_context(prepare_tasks(config.tasks, config.task_paths, config.task_limit))
                    if config.tasks else None)
        harmful_sets = {Path(h).stem if ":" not in h else h.split(":")[-1]: load_prompts(h, limit=limit)
                        for h in harmful}
        benign_sets = {Path(b).stem if ":" not in b else b.split(":")[-1]: load_prompts(b, limit=limit)
                       for b in benign}
        evaluation = evaluate_models(specs, harmful_sets, benign_sets, out, config, prober_path,
                                     _load_judge(judge_model, device), load=lambda s: load_model(s, device=device),
                                     overwrite=overwrite, prepared=prepared)
    click.echo(format_table(evaluation["models"]))
    click.echo(f"evaluation: {Path(out) / 'evaluation.json'}")

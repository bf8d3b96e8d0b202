"""`refusal-cliff guard`: monitor the refusal score, act only on examples that fall off the cliff
(stage: `guard.run_guard`)."""

from __future__ import annotations

from pathlib import Path

import click

from refusal_cliff.cli.options import (
    check_out,
    check_prober,
    check_prompts_fit_before_loading,
    config_file_option,
    config_options,
    model_options,
    out_option,
    overwrite_option,
    resolve,
)
from refusal_cliff.compute.ablation import read_ranking
from refusal_cliff.compute.prober import load_prober
from refusal_cliff.core.config import GenerationConfig, ModelConfig
from refusal_cliff.core.data import load_prompts
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.models import load_model_from
from refusal_cliff.stages.guard import GuardConfig, run_guard


@click.command("guard")
@model_options
@click.option(
    "--prober",
    "prober_path",
    required=True,
    type=click.Path(exists=True),
    help="prober.safetensors (or its folder) written by `probe train` or `layers`.",
)
@click.option(
    "--heads",
    "heads_path",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="heads.json written by `heads` on this model (needed by --action ablate).",
)
@click.option("--prompts", required=True, help="HARMFUL prompts (file, hub dataset id or demo:harmful).")
@click.option("--benign-prompts", default=None, help="Benign prompts, for the over-refusal rate.")
@config_options(GuardConfig)
@config_options(GenerationConfig)
@config_file_option
@out_option
@overwrite_option
def guard_command(prober_path, heads_path, prompts, benign_prompts, out, overwrite, config_file, **options):
    """Generate with a refusal-cliff monitor on the prober's layer and act (ablate / steer / refuse) on the
    answers of flagged examples only; sweep --taus and measure ASR against the benign refusal rate.

    Writes OUT/guard.json, OUT/guard.png and OUT/guard_generations.jsonl (resumable).
    """
    config = resolve(GuardConfig, options)
    generation = resolve(GenerationConfig, options)
    model = resolve(ModelConfig, options)
    if config.action == "ablate" and heads_path is None:
        raise UserError(
            "--action ablate needs the suppression heads: pass --heads heads.json (from "
            "`refusal-cliff heads`)"
        )
    if heads_path is not None:
        read_ranking(heads_path)
    harmful = load_prompts(prompts, column=config.column, limit=config.limit)
    benign = load_prompts(benign_prompts, column=config.column, limit=config.limit) if benign_prompts else []
    check_prober(prober_path)
    check_out(out)
    check_prompts_fit_before_loading(model, [harmful, benign], generation)
    loaded = load_model_from(model)
    prober = load_prober(prober_path, loaded)
    paths = run_guard(
        loaded,
        prober,
        harmful,
        out,
        config,
        generation,
        benign,
        heads_path=heads_path,
        sources={"prompts": prompts, "benign_prompts": benign_prompts},
        overwrite=overwrite,
    )
    for path in paths.values():
        click.echo(f"wrote {Path(path)}")

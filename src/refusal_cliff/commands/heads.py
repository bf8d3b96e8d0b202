"""`heads` and `ablate`: find the refusal suppression heads, then scale them down and measure (paper §4)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UserError
from .common import (generation_config_from, generation_options, load_from_options, model_options,
                     out_option, overwrite_option)

_THRESHOLDS_HELP = "Comma-separated fractions of all n_layers × n_heads heads (1%, 3%, 10% in the paper)."


def _prober_parts(prober_path: str, loaded):
    """(nn.Linear, layer, final_norm_applied) of a prober saved by `probe train`."""
    from ..activations import final_norm_applied
    from ..probe import load_prober

    prober = load_prober(prober_path, loaded)
    n_layers = loaded.adapter.geometry(loaded.model).n_layers
    applied = prober.metadata.get("final_norm_applied", final_norm_applied(prober.layer, n_layers))
    return prober.linear, prober.layer, bool(applied)


@click.command("heads")
@model_options
@click.option("--prober", "prober_path", required=True, type=click.Path(exists=True),
              help="prober.safetensors (or its folder) written by `probe train`.")
@click.option("--generations", required=True, type=click.Path(exists=True, dir_okay=False),
              help="generations.jsonl of a run on HARMFUL prompts.")
@click.option("--labels", default=None, type=click.Path(exists=True, dir_okay=False),
              help="labels.jsonl of that run (default: the one beside --generations).")
@click.option("--group", type=click.Choice(["harmful-complied", "harmful-refused", "all"]),
              default="harmful-complied", show_default=True,
              help="Examples to average over: harmful prompts the model complied with / refused, or all.")
@click.option("--thresholds", default="0.01,0.03,0.1", show_default=True,
              help=_THRESHOLDS_HELP + " Marked in heads.png.")
@click.option("--rank-by", type=click.Choice(["contribution", "exact"]), default="contribution", show_default=True,
              help="Rank by the paper's score w·Δh + b, or by the exact decomposition term.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Sequences per forward pass.")
@out_option
@overwrite_option
def heads_command(prober_path, generations, labels, group, thresholds, rank_by, batch_size, out, overwrite,
                  **options):
    """Rank every attention head by its contribution to the refusal logit at t_cliff (the last
    token of the thinking-end template), from one forward pass per batch.

    Writes OUT/heads.json (most negative first: the refusal suppression heads) and OUT/heads.png
    (layers × heads heatmap, red = towards refusal, blue = away from it).
    """
    from ..attribution import run_heads

    loaded = load_from_options(options)
    linear, layer, applied = _prober_parts(prober_path, loaded)
    path = run_heads(loaded, linear, layer, applied, generations, out, labels=labels, group=group,
                     thresholds=thresholds, batch_size=batch_size, rank_by=rank_by, prober_path=prober_path,
                     overwrite=overwrite)
    click.echo(f"wrote {path}")
    click.echo(f"wrote {path.with_name('heads.png')}")


@click.command("ablate")
@model_options
@click.option("--prober", "prober_path", required=True, type=click.Path(exists=True),
              help="prober.safetensors (or its folder) written by `probe train`.")
@click.option("--heads", "heads_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="heads.json written by `heads`.")
@click.option("--thresholds", default="0.01,0.03,0.1", show_default=True, help=_THRESHOLDS_HELP)
@click.option("--gamma", type=float, default=0.0, show_default=True,
              help="Scale of the chosen heads' outputs: 0 removes them, >1 amplifies them.")
@click.option("--renormalize", is_flag=True,
              help="Rescale each token's o_proj input back to its original norm (cannot be exported).")
@click.option("--prompts", required=True, help="HARMFUL prompts (file, hub dataset id or demo:harmful).")
@click.option("--benign-prompts", default=None, help="Benign prompts, for the over-refusal rate.")
@click.option("--column", default=None, help="Prompt column (detected when omitted).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use the first N prompts of each set.")
@click.option("--judge", default=None, help="LlamaGuard-style judge model for ASR (default: keyword labels).")
@click.option("--no-baseline", is_flag=True, help="Skip measuring the unablated model (threshold 0).")
@generation_options
@out_option
@click.option("--export", "export_dir", default=None, type=click.Path(file_okay=False),
              help="Also write a repaired checkpoint (save_pretrained + tokenizer) with the heads of the "
                   "LARGEST threshold folded into the o_proj weights (or of --export-threshold).")
@click.option("--export-threshold", type=float, default=None,
              help="Threshold whose heads --export folds (default: the largest of --thresholds).")
@overwrite_option
def ablate_command(prober_path, heads_path, thresholds, gamma, renormalize, prompts, benign_prompts, column,
                   limit, judge, no_baseline, out, export_dir, export_threshold, overwrite, **options):
    """Scale the top suppression heads at each threshold by γ, regenerate, and measure the final
    refusal score, the attack success rate and the benign refusal rate (paper Figure 8).

    Writes OUT/ablation.json, OUT/ablation.png and OUT/ablation_generations.jsonl; with --export,
    a repaired model that plain transformers (or vLLM) loads.
    """
    from ..ablation import run_ablate
    from ..data import load_prompts

    if export_threshold is not None and export_dir is None:
        raise UserError("--export-threshold needs --export DIR")
    harmful = load_prompts(prompts, column=column, limit=limit)
    benign = load_prompts(benign_prompts, column=column, limit=limit) if benign_prompts else []
    config = generation_config_from(options)
    device = options.get("device", "auto")
    loaded = load_from_options(options)
    linear, layer, _ = _prober_parts(prober_path, loaded)
    judge_model = None
    if judge:
        from ..labeling import ModelJudge
        from ..models import load_model

        judge_model = ModelJudge(load_model(judge, device=device))
    paths = run_ablate(loaded, linear, layer, heads_path, thresholds, harmful, out, config, benign, gamma,
                       renormalize, judge_model, export_dir, export_threshold, baseline=not no_baseline,
                       prober_path=prober_path, sources={"prompts": prompts, "benign_prompts": benign_prompts},
                       overwrite=overwrite)
    for name, path in paths.items():
        click.echo(f"wrote {Path(path)}" + (" (repaired model)" if name == "export" else ""))

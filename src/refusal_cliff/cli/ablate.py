"""`refusal-cliff ablate`: scale the suppression heads and measure (stage: `ablate.run_ablate`)."""

from __future__ import annotations

from pathlib import Path

import click

from refusal_cliff.cli.options import (
    check_out,
    check_prober,
    config_file_option,
    config_options,
    load_judge,
    model_options,
    out_option,
    overwrite_option,
    resolve,
)
from refusal_cliff.compute.ablation import check_foldable, read_ranking
from refusal_cliff.compute.backends import check_backend
from refusal_cliff.compute.prober import load_prober
from refusal_cliff.core.architectures import get_adapter
from refusal_cliff.core.config import BackendConfig, GenerationConfig, ModelConfig
from refusal_cliff.core.data import load_prompts
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.models import DEFAULT_MODEL, embedded_checkpoint, load_model_from
from refusal_cliff.core.runs import estimate_bytes
from refusal_cliff.stages.ablate import AblateConfig, run_ablate
from refusal_cliff.stages.components import check_ranges, run_ablate_components


@click.command("ablate")
@model_options
@click.option(
    "--prober",
    "prober_path",
    required=True,
    type=click.Path(exists=True),
    help="prober.safetensors (or its folder) written by `probe train`.",
)
@click.option(
    "--heads",
    "heads_path",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="heads.json written by `heads` (not needed with --components).",
)
@click.option("--prompts", required=True, help="HARMFUL prompts (file, hub dataset id or demo:harmful).")
@click.option("--benign-prompts", default=None, help="Benign prompts, for the over-refusal rate.")
@config_options(AblateConfig)
@config_options(GenerationConfig)
@config_options(BackendConfig)
@config_file_option
@out_option
@click.option(
    "--export",
    "export_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Also write a repaired checkpoint (save_pretrained + tokenizer) with the heads of the "
    "LARGEST threshold folded into the o_proj weights (or of --export-threshold).",
)
@overwrite_option
def ablate_command(
    prober_path, heads_path, prompts, benign_prompts, out, export_dir, overwrite, config_file, **options
):
    """Scale the top suppression heads at each threshold by γ, regenerate, and measure the final
    refusal score, the attack success rate and the benign refusal rate (paper Figure 8).

    Writes OUT/ablation.json, OUT/ablation.png and OUT/ablation_generations.jsonl; with --export,
    a repaired model that plain transformers (or vLLM) loads. With --backend vllm the answers of
    each condition come from vLLM on a temporary checkpoint with that condition folded in.
    """
    config = resolve(AblateConfig, options)
    generation = resolve(GenerationConfig, options)
    model = resolve(ModelConfig, options)
    backend = resolve(BackendConfig, options)
    check_backend(backend, [model.model])  # the extra is there, before anything is loaded
    check_foldable(backend, config.renormalize)
    if config.export_threshold is not None and export_dir is None:
        raise UserError("--export-threshold needs --export DIR")
    if config.components:  # ablation by component (issue 12): components.run_ablate_components
        return _ablate_components(
            config,
            generation,
            model,
            prober_path,
            heads_path,
            prompts,
            benign_prompts,
            out,
            export_dir,
            overwrite,
            backend,
        )
    if heads_path is None:
        raise UserError("ablate needs --heads heads.json (or --components mlp:LAYER,... to scale components)")
    read_ranking(heads_path)
    harmful = load_prompts(prompts, column=config.column, limit=config.limit)
    benign = load_prompts(benign_prompts, column=config.column, limit=config.limit) if benign_prompts else []
    check_prober(prober_path)

    check_out(
        out,
        estimate_bytes(
            (len(harmful) + len(benign)) * (len(config.thresholds) + 1),
            generation.max_thinking_tokens + generation.max_answer_tokens,
            8,
        ),
    )
    loaded = load_model_from(model)
    prober = load_prober(prober_path, loaded)
    paths = run_ablate(
        loaded,
        prober,
        heads_path,
        harmful,
        out,
        config,
        generation,
        benign,
        judge=load_judge(config.judge, model.device),
        export_dir=export_dir,
        sources={"prompts": prompts, "benign_prompts": benign_prompts},
        overwrite=overwrite,
        backend=backend,
    )
    for name, path in paths.items():
        click.echo(f"wrote {Path(path)}" + (" (repaired model)" if name == "export" else ""))


def _ablate_components(
    config,
    generation,
    model,
    prober_path,
    heads_path,
    prompts,
    benign_prompts,
    out,
    export_dir,
    overwrite,
    backend=None,
):
    if heads_path is not None:
        raise UserError("give --heads (scale suppression heads) or --components (scale components), not both")
    _check_components_before_loading(config.components, model.model)
    harmful = load_prompts(prompts, column=config.column, limit=config.limit)
    benign = load_prompts(benign_prompts, column=config.column, limit=config.limit) if benign_prompts else []
    check_prober(prober_path)
    check_out(out)
    loaded = load_model_from(model)
    prober = load_prober(prober_path, loaded)
    paths = run_ablate_components(
        loaded,
        prober,
        {",".join(config.components): config.components},
        harmful,
        out,
        config,
        generation,
        benign,
        judge=load_judge(config.judge, model.device),
        export_dir=export_dir,
        overwrite=overwrite,
        sources={"prompts": prompts, "benign_prompts": benign_prompts},
        backend=backend,
    )
    for name, path in paths.items():
        click.echo(
            f"wrote {Path(path)}" + (" (model with the components folded in)" if name == "export" else "")
        )


def _check_components_before_loading(specs, model: str) -> None:
    """Layer and head ranges from the config of a local folder or the embedded model, before any weight
    is loaded (hub ids and GGUF files are checked once loaded)."""
    from transformers import AutoConfig

    folder = embedded_checkpoint() if model in (None, DEFAULT_MODEL) else Path(model).expanduser()
    if not (folder / "config.json").is_file():
        return
    model_config = AutoConfig.from_pretrained(str(folder))
    check_ranges(specs, get_adapter(model_config).geometry(model_config))

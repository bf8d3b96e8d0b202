"""`refusal-cliff clip`: the thinking-clipping study, Figure 5 right (stage: `clip.run_clip`)."""

from __future__ import annotations

from pathlib import Path

import click

from refusal_cliff.cli.options import (
    check_out,
    check_prober,
    config_file_option,
    config_options,
    model_options,
    out_option,
    overwrite_option,
    resolve,
)
from refusal_cliff.compute.backends import check_backend
from refusal_cliff.compute.labeling import read_generations
from refusal_cliff.compute.prober import load_prober
from refusal_cliff.core.config import BackendConfig, ModelConfig
from refusal_cliff.core.models import load_model_from
from refusal_cliff.stages.clip import ClipConfig, run_clip


@click.command("clip")
@model_options
@click.option("--prober", "prober_path", required=True, help="prober.safetensors (or its folder).")
@click.option("--generations", required=True, help="generations.jsonl of HARMFUL prompts.")
@config_options(ClipConfig)
@config_options(BackendConfig)
@config_file_option
@out_option
@overwrite_option
def clip_command(prober_path, generations, out, overwrite, config_file, **options):
    """Thinking-clipping study (Figure 5, right): clip the thinking, regenerate the answer, trace it;
    writes OUT/clipping.json (final score, cliff and refusal rate per fraction)."""
    config = resolve(ClipConfig, options)
    model = resolve(ModelConfig, options)
    backend = resolve(BackendConfig, options)
    check_backend(backend, [model.model])  # the extra is there, before anything is loaded
    read_generations(generations)  # fail before loading the model
    check_prober(prober_path)
    check_out(out)
    loaded = load_model_from(model)
    prober = load_prober(prober_path, loaded)
    rows = run_clip(loaded, prober, generations, out, config, overwrite=overwrite, backend=backend)
    for row in rows:
        rate = "-" if row["refusal_rate"] is None else f"{row['refusal_rate']:.0%}"
        click.echo(
            f"kept {row['fraction']:.2f} of the thinking: final {row['final_mean']:.3f}, refusal rate {rate}"
        )
    click.echo(f"wrote {Path(out) / 'clipping.json'}")

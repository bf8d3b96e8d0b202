"""`refusal-cliff trace`: per-token refusal traces and cliff metrics (stage: `trace.run_trace`)."""

from __future__ import annotations

from pathlib import Path

import click

from ..config import ModelConfig, TraceConfig
from .options import (config_file_option, config_options, load_model_from, model_options, out_option,
                      overwrite_option, resolve)


@click.command("trace")
@model_options
@click.option("--prober", "prober_path", required=True, help="prober.safetensors (or its folder).")
@click.option("--generations", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="generations.jsonl of HARMFUL prompts (repeatable); grouped complied/refused by --labels.")
@click.option("--labels", multiple=True, type=click.Path(dir_okay=False),
              help="labels.jsonl of the harmful generations (repeatable; default: the labels.jsonl beside each "
                   "file, used only if it labels every id of that file).")
@click.option("--harmless-generations", multiple=True, type=click.Path(dir_okay=False),
              help="generations.jsonl of HARMLESS prompts (repeatable): the 'harmless' group.")
@config_options(TraceConfig)
@config_file_option
@out_option
@overwrite_option
def trace_command(prober_path, generations, labels, harmless_generations, out, overwrite, config_file, **options):
    """Score every token of each probing sequence; writes OUT/traces.parquet, OUT/cliff.jsonl, OUT/curves.json."""
    from ..probe import load_prober
    from ..trace import TraceInput, load_trace_inputs, run_trace

    config = resolve(TraceConfig, options)
    model = resolve(ModelConfig, options)
    inputs = [TraceInput(Path(g), True, [Path(p) for p in labels] or None) for g in generations]
    inputs += [TraceInput(Path(g), False) for g in harmless_generations]
    load_trace_inputs(inputs)  # fail before loading the model
    loaded = load_model_from(model)
    prober = load_prober(prober_path, loaded)
    result = run_trace(loaded, prober, inputs, out, config, overwrite=overwrite)
    click.echo(f"traced {result.written} new examples ({result.n_examples} in all): {Path(out) / 'cliff.jsonl'}, "
               f"{Path(out) / 'traces.parquet'}, {Path(out) / 'curves.json'}")

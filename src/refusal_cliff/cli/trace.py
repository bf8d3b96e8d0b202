"""`refusal-cliff trace`: per-token refusal traces and cliff metrics (stage: `trace.run_trace`)."""

from __future__ import annotations

from pathlib import Path

import click

from refusal_cliff.cli.options import (
    check_out,
    check_prober,
    config_file_option,
    config_options,
    executor_from,
    model_options,
    out_option,
    overwrite_option,
    resolve,
)
from refusal_cliff.compute.prober import load_direction, load_prober
from refusal_cliff.compute.tracing import TraceInput, load_trace_inputs
from refusal_cliff.core.config import ExecutorConfig, ModelConfig
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.models import load_model_from
from refusal_cliff.core.runs import estimate_bytes
from refusal_cliff.stages.trace import TraceConfig, run_trace


@click.command("trace")
@model_options
@click.option("--prober", "prober_path", required=True, help="prober.safetensors (or its folder).")
@click.option(
    "--generations",
    required=True,
    multiple=True,
    type=click.Path(dir_okay=False),
    help="generations.jsonl of HARMFUL prompts (repeatable); grouped complied/refused by --labels.",
)
@click.option(
    "--labels",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="labels.jsonl of the harmful generations (repeatable; default: the labels.jsonl beside each "
    "file, used only if it labels every id of that file).",
)
@click.option(
    "--harmless-generations",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="generations.jsonl of HARMLESS prompts (repeatable): the 'harmless' group.",
)
@click.option(
    "--direction",
    "direction_path",
    default=None,
    type=click.Path(),
    help="directions.safetensors (or its folder) written by `probe direction` on this model: also score "
    "every token with its standardised projection (traces' direction_score, "
    "OUT/direction_curves.json).",
)
@config_options(TraceConfig)
@config_options(ExecutorConfig)
@config_file_option
@out_option
@overwrite_option
def trace_command(
    prober_path,
    generations,
    labels,
    harmless_generations,
    direction_path,
    out,
    overwrite,
    config_file,
    **options,
):
    """Score every token of each probing sequence; writes OUT/traces.parquet, OUT/cliff.jsonl, OUT/curves.json."""
    config = resolve(TraceConfig, options)
    model = resolve(ModelConfig, options)
    executor = executor_from(options, model)  # Ray installed, address reachable, GPUs there: before loading
    inputs = [TraceInput(Path(g), True, [Path(p) for p in labels] or None) for g in generations]
    inputs += [TraceInput(Path(g), False) for g in harmless_generations]
    records, _ = load_trace_inputs(inputs)  # fail before loading the model
    check_prober(prober_path)

    fields = ("generation_prompt", "thinking", "answer")
    n_chars = sum(len(str(r.get(k) or "")) for r in records for k in fields)
    check_out(out, estimate_bytes(1, n_chars, 40))  # a token is at least one character
    if direction_path is not None:
        layer = config.direction_layer if (config.direction_layer or 0) >= 0 else None
        load_direction(direction_path, None, layer)  # readable (and has the layer, when one is named)
    elif config.direction_layer is not None:
        raise UserError("--direction-layer needs --direction FILE")
    loaded = load_model_from(model)
    prober = load_prober(prober_path, loaded)
    direction = None
    if direction_path is not None:
        layer = prober.layer if config.direction_layer is None else config.direction_layer
        direction = load_direction(direction_path, loaded, layer)
    with executor:
        result = run_trace(
            loaded, prober, inputs, out, config, overwrite=overwrite, direction=direction, executor=executor
        )
    click.echo(
        f"traced {result.written} new examples ({result.n_examples} in all): {Path(out) / 'cliff.jsonl'}, "
        f"{Path(out) / 'traces.parquet'}, {Path(out) / 'curves.json'}"
    )

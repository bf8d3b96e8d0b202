"""`probe train` and `trace`: the paper's refusal prober and per-token refusal traces (§3, App. A)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UserError
from .common import load_from_options, model_options, out_option, overwrite_option


def _run_digest(run: str | Path) -> dict:
    from ..runs import file_digest

    run = Path(run)
    return {name: file_digest(run / name) for name in ("generations.jsonl", "labels.jsonl")
            if (run / name).is_file()}


def _model_fingerprint(options: dict) -> dict:
    """The model flags that change results (the device does not, beyond float noise)."""
    return {key: options.get(key) for key in ("model", "dtype", "revision")}


def _check_run(run: str, role: str) -> None:
    path = Path(run)
    if not (path / "generations.jsonl").is_file():
        raise UserError(f"--{role} {run} is not a generation run (no generations.jsonl); "
                        "run `refusal-cliff generate --out` and `label` first")
    if not (path / "labels.jsonl").is_file():
        raise UserError(f"--{role} {run} has no labels.jsonl; run `refusal-cliff label --generations "
                        f"{path / 'generations.jsonl'} --out {run}`")


@click.group("probe")
def probe_group():
    """Train the linear refusal prober."""


@probe_group.command("train")
@model_options
@click.option("--harmful", required=True, help="Generation run folder of HARMFUL prompts (refusals = class 1).")
@click.option("--harmless", required=True, help="Generation run folder of HARMLESS prompts (compliance = class 0).")
@click.option("--ood", multiple=True, help="Out-of-distribution generation run(s) for OOD accuracy (repeatable).")
@click.option("--layer", type=int, default=None, help="0-based decoder layer (default: the last, final norm applied).")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--train-batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--val-fraction", type=click.FloatRange(0.01, 0.99), default=0.2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of balancing, split and init.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Sequences per forward pass when capturing activations.")
@out_option
@overwrite_option
def _probe_train_command(harmful, harmless, ood, layer, lr, train_batch_size, epochs, val_fraction, seed,
                        batch_size, out, overwrite, **options):
    """Train the prober on last-token activations; writes OUT/prober.safetensors and OUT/prober.json."""
    from ..probe import save_prober, train_prober_from_runs
    from ..runs import RunFolder

    _check_run(harmful, "harmful")
    _check_run(harmless, "harmless")
    for run in ood:
        _check_run(run, "ood")
    config = {**_model_fingerprint(options), "harmful": _run_digest(harmful), "harmless": _run_digest(harmless),
              "ood": [_run_digest(r) for r in ood], "layer": layer, "lr": lr, "train_batch_size": train_batch_size,
              "epochs": epochs, "val_fraction": val_fraction, "seed": seed}
    stage = RunFolder(out, "probe", config, overwrite=overwrite)
    if stage.is_finished() and stage.path("prober.safetensors").is_file():
        click.echo(f"up to date: {stage.path('prober.safetensors')} (same inputs and settings)")
        return
    loaded = load_from_options(options)
    stage.start(model_id=loaded.model_id, revision=loaded.revision, seed=seed,
                artifacts=["prober.safetensors", "prober.json"])
    prober = train_prober_from_runs(loaded, harmful, harmless, list(ood) or None, layer=layer,
                                    batch_size=batch_size, lr=lr, train_batch_size=train_batch_size,
                                    epochs=epochs, val_fraction=val_fraction, seed=seed)
    path = save_prober(prober, out)
    metrics = prober.metadata["metrics"]
    stage.finish({"metrics": metrics})
    ood_text = f", OOD accuracy {metrics['ood_accuracy']:.3f}" if metrics.get("ood_accuracy") is not None else ""
    click.echo(f"wrote {path}: layer {prober.layer}, validation accuracy {metrics['val_accuracy']:.3f}{ood_text}")


@click.command("trace")
@model_options
@click.option("--prober", "prober_path", required=True, help="prober.safetensors (or its folder).")
@click.option("--generations", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="generations.jsonl of HARMFUL prompts (repeatable); grouped complied/refused by the "
                   "labels.jsonl beside it.")
@click.option("--harmless-generations", multiple=True, type=click.Path(dir_okay=False),
              help="generations.jsonl of HARMLESS prompts (repeatable): the 'harmless' group.")
@click.option("--plateau", "plateau_method", type=click.Choice(["max", "mean"]), default="max", show_default=True,
              help="Plateau: max of the 8-token moving average over the thinking, or its mean.")
@click.option("--t-cliff", "t_cliff_method", type=click.Choice(["last", "max_drop"]), default="last",
              show_default=True, help="t_cliff: last token of the end template, or its largest one-step drop.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@out_option
@overwrite_option
def trace_command(prober_path, generations, harmless_generations, plateau_method, t_cliff_method, batch_size,
                  out, overwrite, **options):
    """Score every token of each probing sequence; writes OUT/traces.parquet, OUT/cliff.jsonl, OUT/curves.json."""
    from ..probe import load_prober
    from ..runs import RunFolder, file_digest
    from ..trace import load_trace_records, run_trace

    prober_file = Path(prober_path) / "prober.safetensors" if Path(prober_path).is_dir() else Path(prober_path)
    if not prober_file.is_file():
        raise UserError(f"no prober at {prober_path}; train one with `refusal-cliff probe train`")
    records, groups = [], {}
    for path, harmful in [*((g, True) for g in generations), *((g, False) for g in harmless_generations)]:
        if not Path(path).is_file():
            raise UserError(f"file not found: {path}")
        run_records, run_groups = load_trace_records(Path(path).parent, harmful)
        records += run_records
        groups.update(run_groups)
    config = {**_model_fingerprint(options), "prober": file_digest(prober_file),
              "inputs": [_run_digest(Path(p).parent) for p in (*generations, *harmless_generations)],
              "plateau": plateau_method, "t_cliff": t_cliff_method}
    stage = RunFolder(out, "trace", config, overwrite=overwrite)
    loaded = load_from_options(options)
    prober = load_prober(prober_path, loaded)
    stage.start(model_id=loaded.model_id, revision=loaded.revision,
                artifacts=["cliff.jsonl", "curves.json", "traces.parquet"])
    written = run_trace(loaded, prober, records, out, groups, batch_size, plateau_method, t_cliff_method)
    stage.finish({"n_examples": len(records)})
    click.echo(f"traced {written} new examples ({len(records)} in all): {Path(out) / 'cliff.jsonl'}, "
               f"{Path(out) / 'traces.parquet'}, {Path(out) / 'curves.json'}")


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated layer numbers, got {text!r}") from None


def _fraction_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated fractions, got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise UserError(f"fractions must lie in [0, 1], got {text!r}")
    return values


@click.command("layers")
@model_options
@click.option("--harmful", required=True, help="Generation run folder of HARMFUL prompts (with labels.jsonl).")
@click.option("--harmless", required=True, help="Generation run folder of HARMLESS prompts (with labels.jsonl).")
@click.option("--layers", "layer_list", default="auto", show_default=True,
              help="Comma-separated 0-based layers (negative: from the end), or 'auto' (5 evenly spaced); "
                   "the last layer is always added.")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True, help="Prober epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@out_option
def layers_command(harmful, harmless, layer_list, epochs, batch_size, out, **options):
    """Layer-wise study (Figure 5, left): a prober per layer, every example traced at every layer;
    writes OUT/layer_KK/prober.* and OUT/layerwise.json."""
    from ..studies import run_layer_study

    _check_run(harmful, "harmful")
    _check_run(harmless, "harmless")
    layers = None if layer_list == "auto" else _int_list(layer_list)
    loaded = load_from_options(options)
    if layers is None:
        n_layers = loaded.adapter.geometry(loaded.model).n_layers
        layers = sorted({round(i * (n_layers - 1) / 4) for i in range(5)})
    probers = run_layer_study(loaded, harmful, harmless, layers, out, epochs=epochs, batch_size=batch_size)
    for layer, prober in sorted(probers.items()):
        click.echo(f"layer {layer:>3}: validation accuracy {prober.metadata['metrics']['val_accuracy']:.3f}")
    click.echo(f"wrote {Path(out) / 'layerwise.json'}")


@click.command("clip")
@model_options
@click.option("--prober", "prober_path", required=True, help="prober.safetensors (or its folder).")
@click.option("--generations", required=True, help="generations.jsonl of HARMFUL prompts.")
@click.option("--fractions", default="0,0.25,0.5,0.75,1", show_default=True,
              help="Fractions of the thinking's tokens kept before the end template is appended.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use the first N examples.")
@click.option("--max-answer-tokens", type=click.IntRange(min=1), default=96, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@out_option
def clip_command(prober_path, generations, fractions, limit, max_answer_tokens, batch_size, out, **options):
    """Thinking-clipping study (Figure 5, right): clip the thinking, regenerate the answer, trace it;
    writes OUT/clipping.json (final score, cliff and refusal rate per fraction)."""
    from ..probe import load_prober
    from ..runs import read_jsonl
    from ..studies import run_clipping_study

    if not Path(generations).is_file():
        raise UserError(f"file not found: {generations}; pass a generations.jsonl written by `generate`")
    records = read_jsonl(generations)[:limit] if limit else read_jsonl(generations)
    if not records or "thinking" not in records[0]:
        raise UserError(f"{generations} holds no generation records with thinking")
    values = _fraction_list(fractions)
    loaded = load_from_options(options)
    prober = load_prober(prober_path, loaded)
    rows = run_clipping_study(loaded, prober, records, values, out, max_answer_tokens, batch_size)
    for row in rows:
        rate = "-" if row["refusal_rate"] is None else f"{row['refusal_rate']:.0%}"
        click.echo(f"kept {row['fraction']:.2f} of the thinking: final {row['final_mean']:.3f}, refusal rate {rate}")
    click.echo(f"wrote {Path(out) / 'clipping.json'}")

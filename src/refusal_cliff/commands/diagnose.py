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

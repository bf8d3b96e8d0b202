"""`demo`: the whole diagnosis on the embedded model and the built-in prompts."""

from __future__ import annotations

import time

import click

from ..config import ModelConfig
from .options import load_model_from, model_options, out_option, resolve


@click.command("demo")
@model_options
@click.option("--quick", is_flag=True, help="A ~2-minute version: fewer prompts, shorter budgets.")
@click.option(
    "--repair",
    is_flag=True,
    help="Also run Cliff-as-a-Judge selection, a LoRA fine-tune and the before/after evaluation (§5).",
)
@out_option
def demo_command(quick, repair, out, **options):
    """Run the diagnosis end to end (generate, label, prober, traces, layer-wise, clipping, heads,
    ablation, report) and print where the report is."""
    from ..demo import run_demo

    start = time.perf_counter()
    loaded = load_model_from(resolve(ModelConfig, options))
    report = run_demo(loaded, out, quick=quick, repair=repair, on_stage=lambda m: click.echo(f"==> {m}"))
    click.echo(f"done in {time.perf_counter() - start:.0f} s; report: {report}")

"""`demo`: the whole diagnosis on the cliff organism (or any model) and the built-in prompts."""

from __future__ import annotations

import time

import click

from refusal_cliff.cli.options import config_file_option, config_options, out_option, resolve
from refusal_cliff.core.models import load_model_from
from refusal_cliff.stages.demo import DemoModelConfig, run_demo


@click.command("demo")
@config_options(DemoModelConfig)
@click.option("--quick", is_flag=True, help="A ~2-minute version: fewer prompts, shorter budgets.")
@click.option(
    "--repair",
    is_flag=True,
    help="Also run Cliff-as-a-Judge selection, a LoRA fine-tune and the before/after evaluation (§5).",
)
@config_file_option
@out_option
def demo_command(quick, repair, out, config_file, **options):
    """Run the diagnosis end to end (generate, label, prober, traces, layer-wise, clipping, heads,
    ablation, report) and print where the report is."""
    start = time.perf_counter()
    loaded = load_model_from(resolve(DemoModelConfig, options))
    report = run_demo(loaded, out, quick=quick, repair=repair, on_stage=lambda m: click.echo(f"==> {m}"))
    click.echo(f"done in {time.perf_counter() - start:.0f} s; report: {report}")

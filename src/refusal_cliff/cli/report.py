"""`refusal-cliff report`: render a run folder's artifacts into report.html, summary.json and PNGs."""

from __future__ import annotations

from pathlib import Path

import click

from refusal_cliff.report import SUMMARY_NAME, render_report


@click.command("report")
@click.option(
    "--run",
    "run_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Run folder to report on (its immediate sub-folders are searched too).",
)
@click.option(
    "--top",
    "top_examples",
    default=10,
    show_default=True,
    type=click.IntRange(min=1),
    help="How many examples with the largest misalignment score to show.",
)
def report(run_dir: Path, top_examples: int) -> None:
    """Write report.html, summary.json and fig_*.png into the run folder."""
    path = render_report(run_dir, top_examples=top_examples)
    click.echo(f"report:  {path}")
    click.echo(f"summary: {path.parent / SUMMARY_NAME}")

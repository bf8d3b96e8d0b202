"""`refusal-cliff organism`: build the cliff organism (stage: `organism.run_organism`)."""

from __future__ import annotations

import click

from refusal_cliff.cli.options import config_file_option, config_options, resolve
from refusal_cliff.stages.organism import OrganismConfig, run_organism


@click.command("organism")
@click.option(
    "--model",
    "base_model",
    default="default",
    show_default=True,
    help="Base model to make the organism from: 'default' (the embedded SmolLM2-135M-Instruct), a local "
    "folder or a hub id of a supported architecture.",
)
@config_options(OrganismConfig)
@config_file_option
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder to write the checkpoint into (default: the cache, by fingerprint; `--model organism` "
    "loads the default recipe's from there).",
)
@click.option("--overwrite", is_flag=True, help="Replace an organism of another recipe already in --out.")
def organism_command(base_model, out, overwrite, config_file, **options):
    """Build a small reasoning model with a planted refusal cliff: its thinking refuses every harmful
    request, and a few named heads make it comply with wrapped ones (a known answer for every stage)."""
    config = resolve(OrganismConfig, options)
    result = run_organism(config, base_model, out, overwrite=overwrite)
    heads = ", ".join(f"{layer}.{head}" for layer, head in result.planted_heads)
    how = "reused" if result.reused else f"built in {result.record.get('build_s', 0):.0f} s"
    click.echo(f"organism: {result.path} ({how}); planted heads (layer.head): {heads}")

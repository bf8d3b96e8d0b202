"""`refusal-cliff models`: the supported architectures."""

from __future__ import annotations

import click


@click.command("models")
def models_command():
    """List the supported architectures."""
    from ..architectures import supported_architectures

    for name in supported_architectures():
        click.echo(name)

"""`refusal-cliff models`: the supported architectures."""

from __future__ import annotations

import click

from refusal_cliff.core.architectures import supported_architectures


@click.command("models")
def models_command():
    """List the supported architectures."""
    for name in supported_architectures():
        click.echo(name)

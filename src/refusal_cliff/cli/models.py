"""`refusal-cliff models`: the supported architectures and the built-in model ids."""

from __future__ import annotations

import click

from refusal_cliff.core.architectures import supported_architectures
from refusal_cliff.core.models import BUILTIN_MODELS, DEFAULT_MODEL, EMBEDDED_NAME


@click.command("models")
def models_command():
    """List the supported architectures, then the built-in model ids `--model` takes."""
    for name in supported_architectures():
        click.echo(name)
    click.echo(f"\nbuilt-in model ids:\n  {DEFAULT_MODEL}: {EMBEDDED_NAME}, embedded (a GGUF file from PyPI)")
    for model in BUILTIN_MODELS.values():
        state = "cached" if model.cached() is not None else "built on first use"
        click.echo(f"  {model.name}: {model.description} ({state})")

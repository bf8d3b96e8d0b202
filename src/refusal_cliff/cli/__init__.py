"""The `refusal-cliff` command line: parses flags and calls one stage per verb; no logic here.

A `UserError` (bad input) prints one line and exits with status 2, without a traceback; so does an
`OSError` or `UnicodeDecodeError` on a user's file (read-only, disk full, permission, not UTF-8).
`--debug` (or `REFUSAL_CLIFF_DEBUG=1`) shows the traceback instead, for bug reports.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from refusal_cliff import __version__
from refusal_cliff.cli import (
    ablate,
    clip,
    components,
    demo,
    evaluate,
    finetune,
    generate,
    guard,
    heads,
    label,
    layers,
    models,
    organism,
    probe,
    report,
    select,
    trace,
)
from refusal_cliff.core.errors import DEBUG_ENV, UserError, debug_enabled, describe_file_error

# One module per verb, in help order. Each module defines the click command of its verb; a module that
# fails to import is an error, never a silently missing verb.
_COMMAND_MODULES = [
    models,
    generate,
    label,
    probe,
    trace,
    layers,
    clip,
    heads,
    components,
    ablate,
    guard,
    select,
    finetune,
    evaluate,
    report,
    organism,
    demo,
]


def _debug(ctx) -> bool:
    return bool(ctx.params.get("debug")) or debug_enabled()


class _Group(click.Group):
    def invoke(self, ctx):
        # --debug is seen by the library too (the engines it starts, vLLM, log); set for this command only
        # and restored after it, so that a command run in-process (tests, notebooks) does not leak it
        previous = os.environ.get(DEBUG_ENV)
        if ctx.params.get("debug"):
            os.environ[DEBUG_ENV] = "1"
        try:
            return self._invoke(ctx)
        finally:
            if previous is None:
                os.environ.pop(DEBUG_ENV, None)
            else:
                os.environ[DEBUG_ENV] = previous

    def _invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            if _debug(ctx):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except (OSError, UnicodeDecodeError) as exc:  # a user's file: read-only, disk full, not UTF-8...
            if _debug(ctx):
                raise
            click.echo(f"error: {describe_file_error(exc)}", err=True)
            sys.exit(2)
        except click.UsageError as exc:  # a missing or malformed flag: one line, not a usage block
            names, context = [], exc.ctx
            while context is not None and context.parent is not None:
                names.insert(0, context.info_name)
                context = context.parent
            click.echo(
                f"error: {exc.format_message()} (see: refusal-cliff {' '.join([*names, '--help'])})", err=True
            )
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: re-run the same command to resume where it stopped", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="refusal-cliff")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option(
    "--debug",
    is_flag=True,
    help="Show the traceback of an error, for bug reports (or REFUSAL_CLIFF_DEBUG=1).",
)
def main(verbose: int, quiet: bool, debug: bool) -> None:
    """Diagnose and repair the refusal cliff of reasoning models (arXiv 2510.06036)."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "httpx", "httpx2", "urllib3", "matplotlib", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose < 2 else logging.INFO)


def _register() -> None:
    for module in _COMMAND_MODULES:
        commands = [
            value
            for name, value in vars(module).items()
            if isinstance(value, click.Command)
            and not name.startswith("_")
            and value.callback.__module__ == module.__name__
        ]
        if not commands:
            raise RuntimeError(f"{module.__name__} defines no click command")
        for command in commands:
            if command.name in main.commands:
                raise RuntimeError(f"two modules define the verb {command.name!r}")
            main.add_command(command)


_register()

"""User-facing errors.

A `UserError` is bad input the user can fix (a missing file, a wrong column, an
unsupported architecture...). The CLI prints its message on one line and exits
with status 2, without a traceback. Library code raises it; it never calls
`sys.exit` itself.
"""


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do."""


class MissingExtraError(UserError):
    """An optional dependency is missing."""

    def __init__(self, package: str, extra: str):
        super().__init__(
            f"this needs the optional package {package!r}: "
            f"pip install 'refusal-cliff[{extra}]'"
        )


def require(module: str, extra: str):
    """Import an optional heavy dependency lazily, or raise a MissingExtraError."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(module.split(".")[0], extra) from exc

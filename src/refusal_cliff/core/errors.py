"""User-facing errors.

A `UserError` is bad input the user can fix (a missing file, a wrong column, an
unsupported architecture...). The CLI prints its message on one line and exits
with status 2, without a traceback. Library code raises it; it never calls
`sys.exit` itself.
"""

import errno
import importlib
import io
import os


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do."""


class MissingExtraError(UserError):
    """An optional dependency is missing."""

    def __init__(self, package: str, extra: str):
        super().__init__(f"this needs the optional package {package!r}: pip install 'refusal-cliff[{extra}]'")


def require(module: str, extra: str):
    """Import an optional heavy dependency lazily, or raise a MissingExtraError."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(module.split(".")[0], extra) from exc


# What a user can do about an operating-system error, by errno name.
_OS_ADVICE = {
    "EROFS": "the file system is read-only; pass an --out on a writable disk",
    "ENOSPC": "the disk is full; free some space (or use an --out on another disk) and re-run to resume",
    "EDQUOT": "the disk quota is used up; free some space (or use an --out on another disk) and re-run to resume",
    "EACCES": "check the permissions, or pass a path you can write to",
    "EPERM": "check the permissions, or pass a path you can write to",
    "ENOTDIR": "a part of this path is a file, not a folder; pass another path",
    "EISDIR": "this is a folder; pass a file",
    "ENOENT": "check the path",
    "EEXIST": "remove it or pass another path",
    "ENAMETOOLONG": "use a shorter path",
    "EMFILE": "too many open files; raise the limit (ulimit -n) and re-run",
    "EFBIG": "the file outgrew the file-size limit (ulimit -f) or the file system's; raise it and re-run to resume",
}
_PATH_LOCALS = ("path", "target", "filename", "file", "generations", "out", "root")


def _path_in_traceback(exc: BaseException) -> str | None:
    """The file an exception was raised on, from the innermost frame that names one.

    An `OSError` usually carries its filename; one raised on a write (disk full) or a
    `UnicodeDecodeError` does not, so look for an open file or a path variable instead."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        values = frame.f_locals
        for value in values.values():
            if isinstance(value, io.IOBase) and isinstance(getattr(value, "name", None), str):
                return value.name
        for name in _PATH_LOCALS:
            value = values.get(name)
            if isinstance(value, (str, os.PathLike)) and str(value):
                return str(value)
    return None


def describe_file_error(exc: OSError | UnicodeDecodeError) -> str:
    """One line for an `OSError` or `UnicodeDecodeError` on a user's file: `<path>: <cause>; <what to do>`."""
    if isinstance(exc, UnicodeDecodeError):
        path = _path_in_traceback(exc)
        cause = f"not UTF-8 text (byte {exc.object[exc.start : exc.start + 1]!r} at offset {exc.start})"
        advice = "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8), or check that this is the right file"
    else:
        path = exc.filename if exc.filename is not None else _path_in_traceback(exc)
        if exc.filename2 is not None:
            path = f"{path} -> {exc.filename2}"
        name = errno.errorcode.get(exc.errno or -1, "")
        cause = (exc.strerror or type(exc).__name__).rstrip(".").lower()
        advice = _OS_ADVICE.get(name, "check the path, or re-run with --debug to see where it failed")
    return f"{path}: {cause}; {advice}" if path else f"{cause}; {advice}"


def require_regular_file(path: str | os.PathLike, hint: str = "check the path") -> None:
    """Raise UserError unless `path` is a regular file (or a link to one): a missing path, a folder, a FIFO
    or a device (/dev/zero) each get their own message, never "empty" or "not found" for the wrong reason."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"file not found: {path}; {hint}")
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not a file; {hint}")
    if not os.path.isfile(path):
        raise UserError(f"{path} is not a regular file (a FIFO, socket or device); {hint}")


DEBUG_ENV = "REFUSAL_CLIFF_DEBUG"


def debug_enabled() -> bool:
    """`--debug` or REFUSAL_CLIFF_DEBUG=1: tracebacks, and the logs of the engines we start (vLLM)."""
    return os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")

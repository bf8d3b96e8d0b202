"""Run folders: metadata, fingerprints, resumable JSONL streams.

Every verb writes into a folder the caller names (`--out DIR`). `metadata.json`
records the schema version, the resolved config, package versions, the model id
and revision, and the seed. A stage re-run with the same fingerprint (inputs +
config) reuses finished work; a stage interrupted part-way resumes from the last
complete example; a folder holding a run with a *different* fingerprint is never
overwritten unless the user asks (`--overwrite`). One run at a time writes a folder: `RunFolder.start`
takes a lock on it (`filelock`, an fcntl lock that dies with its process, so a killed run never blocks the
next) before anything is moved or written, and a second writer is refused at once, naming the first.
`metadata.json` is strict JSON: a NaN or infinity never reaches it (they are written as null).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from refusal_cliff.core.errors import UserError, require_regular_file

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_PACKAGES = ("refusal-cliff", "torch", "transformers", "safetensors", "numpy", "trl", "peft", "lm-eval")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (inputs are part of a stage's fingerprint)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(payload: Any) -> str:
    """A stable hash of a JSON-serialisable payload (config + input digests)."""
    if is_dataclass(payload):
        payload = asdict(payload)
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp: str | Path, path: str | Path) -> None:
    """Move a finished temporary file into place with the mode of a normal file (0666 & ~umask).

    Writers such as `mkstemp` or safetensors create 0600 files; every artifact gets the same mode.
    """
    os.chmod(tmp, 0o666 & ~_current_umask())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so that a crash leaves either the old or the new content, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any, strict: bool = False) -> None:
    """Write `obj` as indented JSON. `strict`: NaN and infinity become null, so that any JSON parser reads
    the file (`metadata.json` is always written strict)."""
    if strict:
        obj = finite_json(obj)
    text = json.dumps(obj, indent=2, sort_keys=False, default=str, allow_nan=not strict)
    atomic_write_text(path, text + "\n")


def finite_json(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None (dicts, lists and tuples walked)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: finite_json(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(value) for value in obj]
    return obj


def read_json(path: str | Path) -> Any:
    path = Path(path)
    require_regular_file(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON (line {exc.lineno}); regenerate it") from None


def _human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1024 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TB"  # pragma: no cover


def check_out_dir(out: str | Path, expected_bytes: int = 0) -> None:
    """Raise UserError unless `out` can be a run folder: a folder (or a path to create) on a writable
    file system with room for about `expected_bytes` of artifacts. Writes nothing, so every verb calls
    it before loading a model; a conservative `expected_bytes` (see `estimate_bytes`) is enough."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory; pass a folder (it is created if missing)")
    existing = out
    while not existing.exists():  # the nearest existing ancestor is where the folder will be created
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is a file, not a directory (ENOTDIR); pass another path")
    try:
        flags = os.statvfs(existing).f_flag
    except OSError:
        flags = 0
    if flags & getattr(os, "ST_RDONLY", 1) or not os.access(existing, os.W_OK | os.X_OK):
        read_only = bool(flags & getattr(os, "ST_RDONLY", 1))
        cause = "is on a read-only file system" if read_only else "is not writable"
        code = errno.errorcode[errno.EROFS if read_only else errno.EACCES]
        raise UserError(f"--out {out}: {existing} {cause} ({code}); pass an --out on a writable disk")
    if expected_bytes > 0:
        free = shutil.disk_usage(existing).free
        if free < expected_bytes:
            raise UserError(
                f"--out {out}: {_human_bytes(free)} free on its disk, but this run needs "
                f"about {_human_bytes(expected_bytes)}; free some space or use an --out on another disk"
            )


def estimate_bytes(n_examples: int, tokens_per_example: int, bytes_per_token: int) -> int:
    """The expected size of a run's main artifact: examples × tokens × bytes per token (generations
    ~ 8 bytes a token, traces ~ 40), for `check_out_dir`."""
    return max(0, n_examples) * max(0, tokens_per_example) * bytes_per_token


BACKUP_PREFIX = ".replaced-"
LOCK_NAME = ".refusal-cliff.lock"  # beside it, LOCK_NAME + ".pid" holds the holder's pid

_HELD: dict[str, list] = {}  # folder -> [its FileLock, how many RunFolders of this process hold it]


def lock_folder(root: str | Path) -> None:
    """Take the write lock of `root` for this process (again, if a stage of this process holds it already).

    Raises UserError at once, naming the holder's pid, if another process holds it. The lock is an fcntl
    lock: the operating system drops it when its process dies, so a killed run never blocks the next."""
    key = str(Path(root).resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        return
    lock = FileLock(os.path.join(key, LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = Path(key, LOCK_NAME + ".pid").read_text().strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise UserError(
            f"{root} is being written by another refusal-cliff run (pid {holder}); wait for it to finish, "
            "or pass another --out"
        ) from None
    atomic_write_text(Path(key, LOCK_NAME + ".pid"), f"{os.getpid()}\n")
    _HELD[key] = [lock, 1]


def unlock_folder(root: str | Path) -> None:
    """Give back one hold of `root`'s write lock (the lock itself when the last one is given back)."""
    key = str(Path(root).resolve())
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[key]
        with contextlib.suppress(OSError):
            Path(key, LOCK_NAME + ".pid").unlink()
        held[0].release()


def accelerator() -> str:
    """Where this process computes: the CUDA device's name (and count) once something has run on a GPU
    (the model is loaded before a stage starts), else "cpu", also on a GPU host running --device cpu."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return "cpu"
    count = torch.cuda.device_count()
    return f"{torch.cuda.get_device_name(torch.cuda.current_device())}" + (f" x{count}" if count > 1 else "")


class RunFolder:
    """One stage's output folder: config, fingerprint, resume, `metadata.json`, safe overwrite.

    Usage (every `run_<verb>` follows it):

        run = RunFolder(out, stage="trace", config=config_dict, overwrite=overwrite,
                        artifacts=["cliff.jsonl", "traces.parquet"])
        ...validate every input first...
        with run.start(model_id=..., revision=..., seed=...):   # resumed: run.resumed
            ...write artifacts with run.path("cliff.jsonl")...
            run.finish(extra={...})

    With `overwrite`, the artifacts of a run with another fingerprint are moved aside into a hidden
    folder (not deleted) when the stage starts; they are deleted only by `finish()`. Any error
    before `finish()` (a late bad input, an interrupt) removes what the new run wrote and puts the
    old artifacts back, so a failed `--overwrite` never loses the earlier results.
    """

    def __init__(
        self,
        root: str | Path,
        stage: str,
        config: dict,
        overwrite: bool = False,
        artifacts: Iterable[str] = (),
    ):
        self.root = Path(root)
        self.stage = stage
        self.config = config
        self.overwrite = overwrite
        self.artifacts = list(artifacts)
        self.fingerprint = fingerprint({"stage": stage, "config": config})
        self.resumed = False
        self._backup: Path | None = None
        self._finished = False
        self._locked = False

    @property
    def metadata_path(self) -> Path:
        return self.root / f"metadata.{self.stage}.json" if self._shared() else self.root / "metadata.json"

    def _shared(self) -> bool:
        # Several stages may share a folder (generate + label make a "generation run"):
        # the first stage owns metadata.json, others write metadata.<stage>.json.
        main = self.root / "metadata.json"
        if not main.is_file():
            return False
        try:
            return json.loads(main.read_text()).get("stage") != self.stage
        except (json.JSONDecodeError, OSError):
            return False

    def path(self, name: str) -> Path:
        return self.root / name

    def measured_conditions(self, results: str, generations: str, key: Callable[[dict], Any]):
        """Resume a run that measures conditions one after another (`ablate`, `ablate --components`): the
        records of `results` (a JSON list, one record per finished condition) if this run resumed, and
        the set of their `key`s; the rows of `generations` (JSONL) whose `key` is not among them, the
        cut-off condition's, are dropped, so no condition is measured or written twice."""
        results_path, generations_path = self.path(results), self.path(generations)
        records: list[dict] = read_json(results_path) if self.resumed and results_path.is_file() else []
        done = {key(record) for record in records}
        if done:
            logger.info("resuming: %d conditions already measured", len(done))
        if generations_path.exists():
            write_jsonl(generations_path, [row for row in read_jsonl(generations_path) if key(row) in done])
        return records, done

    def previous(self) -> dict | None:
        path = self.metadata_path
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def check(self) -> bool:
        """Raise UserError if the folder holds another run of this stage and `overwrite` is off.

        Returns True if a previous run with the same fingerprint will be resumed. Writes nothing,
        so a stage calls it before any slow work.
        """
        previous = self.previous()
        if previous is not None and previous.get("fingerprint") == self.fingerprint:
            return True
        existing = [a for a in self.artifacts if self.path(a).exists()]
        if ((previous is not None and previous.get("finished")) or existing) and not self.overwrite:
            raise UserError(
                f"{self.root} already holds a '{self.stage}' run with different inputs or settings; "
                "use another --out, or pass --overwrite to replace it"
            )
        return False

    def start(
        self,
        model_id: str | None = None,
        revision: str | None = None,
        seed: int | None = None,
        artifacts: Iterable[str] | None = None,
        extra: dict | None = None,
    ) -> RunFolder:
        """Create the folder and record metadata; `self.resumed` says whether a run is resumed.

        Raises UserError if the folder holds this stage's artifacts from a run with another
        fingerprint, unless `overwrite` was set (then those artifacts are moved aside, and restored
        if the stage fails before `finish`). Returns self, a context manager that restores on error.
        """
        if artifacts is not None:
            self.artifacts = list(artifacts)
        self.root.mkdir(parents=True, exist_ok=True)
        if not self._locked:  # before anything is moved or written; held until finish() or an error
            lock_folder(self.root)
            self._locked = True
        try:
            return self._start(model_id, revision, seed, extra)
        except BaseException:
            self.unlock()
            raise

    def unlock(self) -> None:
        """Give back the folder's write lock (done by `finish` and on an error; idempotent)."""
        if self._locked:
            self._locked = False
            unlock_folder(self.root)

    def _start(self, model_id, revision, seed, extra) -> RunFolder:
        self.resumed = self.check()
        previous = self.previous()
        if not self.resumed:
            existing = [a for a in self.artifacts if self.path(a).exists()]
            if self.metadata_path.exists() and previous is not None:
                existing.append(self.metadata_path.name)
            if existing:
                self._backup = Path(tempfile.mkdtemp(prefix=f"{BACKUP_PREFIX}{self.stage}-", dir=self.root))
                for name in existing:
                    os.replace(self.path(name), self._backup / name)
        self.metadata = {
            "schema_version": SCHEMA_VERSION,
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "model_id": model_id,
            "model_revision": revision,
            "seed": seed,
            "packages": package_versions(),
            "accelerator": accelerator(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "finished": None,
            **(extra or {}),
        }
        if self.resumed and previous:
            self.metadata["started"] = previous.get("started", self.metadata["started"])
        write_json(self.metadata_path, self.metadata, strict=True)
        return self

    def rollback(self) -> None:
        """Undo an `--overwrite` start: delete what this run wrote, restore the moved-aside artifacts."""
        if self._backup is None:
            return
        saved = set(os.listdir(self._backup))
        for name in set(self.artifacts) | saved:  # remove what the new run wrote
            target = self.path(name)
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
        for name in saved:
            os.replace(self._backup / name, self.path(name))
        shutil.rmtree(self._backup, ignore_errors=True)
        self._backup = None
        logger.warning("%s: the '%s' run failed; the previous results were restored", self.root, self.stage)

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None and not self._finished:
                self.rollback()
        finally:
            self.unlock()

    def is_finished(self) -> bool:
        previous = self.previous()
        return bool(previous and previous.get("fingerprint") == self.fingerprint and previous.get("finished"))

    def finish(self, extra: dict | None = None) -> None:
        self.metadata["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if extra:
            self.metadata.update(extra)
        write_json(self.metadata_path, self.metadata, strict=True)
        self._finished = True
        if self._backup is not None:
            shutil.rmtree(self._backup, ignore_errors=True)
            self._backup = None
        for stale in self.root.glob(f"{BACKUP_PREFIX}{self.stage}-*"):  # left by a killed --overwrite run
            shutil.rmtree(stale, ignore_errors=True)
        self.unlock()


# -- JSONL streams ----------------------------------------------------------------------


_WARNED_TORN: set[tuple[str, int]] = set()


def read_jsonl(path: str | Path, repair: bool = False) -> list[dict]:
    """Read a JSONL file. A torn last line (a killed writer) is dropped, and cut off if `repair`."""
    path = Path(path)
    require_regular_file(path)
    data = path.read_bytes()
    records, offset = [], 0
    lines = data.split(b"\n")
    for index, raw in enumerate(lines):
        is_last = index == len(lines) - 1  # text after the final newline: possibly torn
        if raw.strip():
            try:
                records.append(json.loads(raw))
            except (json.JSONDecodeError, UnicodeDecodeError):  # a cut may split a multibyte character
                if not is_last:
                    raise UserError(
                        f"{path}: line {index + 1} is not valid JSON; fix or delete the file"
                    ) from None
                stamp = (str(path.resolve()), len(data))
                if stamp not in _WARNED_TORN:  # once per file, though a verb checks it and then reads it
                    _WARNED_TORN.add(stamp)
                    logger.warning("%s: dropping a torn last line (an interrupted write)", path)
                if repair:
                    with open(path, "r+b") as handle:
                        handle.truncate(offset)
                break
        offset += len(raw) + 1
    return records


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    yield from read_jsonl(path)


class JsonlWriter:
    """Append records to a JSONL file, one flushed line per record (safe to kill at any time)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            read_jsonl(self.path, repair=True)  # cut a torn last line left by a killed writer
            with open(self.path, "rb+") as handle:  # a complete record missing its newline
                size = handle.seek(0, os.SEEK_END)
                if size:
                    handle.seek(size - 1)
                    if handle.read(1) != b"\n":
                        handle.write(b"\n")
        self._handle = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def completed_ids(path: str | Path) -> set[str]:
    """Ids already written to a resumable JSONL artifact (repairing a torn last line)."""
    path = Path(path)
    if not path.exists():
        return set()
    return {str(r["id"]) for r in read_jsonl(path, repair=True) if "id" in r}


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Write a whole JSONL file atomically (for small artifacts that are not streamed)."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Lists of `size` items (the last one shorter) from any iterable, consumed lazily."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def fingerprint_ids(items: Iterable) -> str:
    """A short digest of an ordered collection of ids (part of a stage's fingerprint)."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(str(item).encode() + b"\n")
    return digest.hexdigest()[:16]

"""The reliability suite's machinery (issue 13, part 5): run the CLI in a child process that can be
killed with SIGKILL at any moment, compare a run's artifacts with an uninterrupted run's, and record
every outcome for `tests/reliability_report.py`.

Children are forked from a `multiprocessing` fork server that has already imported torch,
transformers and every stage, so a CLI run costs its own work and not 20 s of imports; each child
is still a separate process that a SIGKILL ends exactly as it ends `refusal-cliff` in a shell (its
stdout and stderr go to a log file, `REFUSAL_CLIFF_*`/`HF_*` variables are set in it).
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path

TRIALS = int(os.environ.get("RELIABILITY_TRIALS", "2"))  # kill -9 trials per verb; `make reliability` sets 20
RESULTS = os.environ.get("RELIABILITY_RESULTS")  # a JSONL file the outcomes are appended to, for the table
_PRELOAD = [
    "refusal_cliff.cli",
    "torch",
    "transformers",
    "refusal_cliff.core.models",
    "refusal_cliff.compute.generation",
    "refusal_cliff.compute.tracing",
    "refusal_cliff.stages.select",
    "refusal_cliff.compute.ablation",
    "refusal_cliff.compute.attribution",
    "refusal_cliff.stages.evaluate",
    "refusal_cliff.compute.prober",
    "refusal_cliff.compute.labeling",
    "refusal_cliff.stages.layers",
    "refusal_cliff.report.plotting",
]
_context = None


def context():
    """The fork-server context (started once, with the heavy modules imported)."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    return _context


def _child(
    args: list[str], log: str, env: dict[str, str], cwd: str | None
) -> None:  # pragma: no cover - child
    os.environ.update(env)
    for name in [k for k in os.environ if k.startswith("RELIABILITY_")]:
        value = os.environ.pop(name)
        if (
            name == "RELIABILITY_FSIZE"
        ):  # a file-size limit (ulimit -f); ignore SIGXFSZ so a write raises EFBIG
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(value), int(value)))
    if cwd:
        os.chdir(cwd)
    os.dup2(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)  # stdout: LOG, stderr: LOG.err
    os.dup2(os.open(log + ".err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
    sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False, buffering=1)
    sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False, buffering=1)
    import torch

    torch.set_num_threads(1)
    from refusal_cliff.cli import main

    main.main(args=[str(a) for a in args], prog_name="refusal-cliff", standalone_mode=True)


class Child:
    """One CLI run in a forked child: `wait()` for it or `kill()` it (SIGKILL)."""

    def __init__(self, args, log: Path, env: dict | None = None, cwd: Path | None = None):
        self.log = Path(log)
        self.process = context().Process(
            target=_child, args=([str(a) for a in args], str(log), env or {}, str(cwd) if cwd else None)
        )
        self.started = time.perf_counter()
        self.process.start()

    def wait(self, timeout: float = 600) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.kill()
            raise TimeoutError(f"{self.log}: still running after {timeout} s")
        return self.process.exitcode

    def kill(self) -> bool:
        """SIGKILL; True if the child was still running."""
        alive = self.process.is_alive()
        if alive:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join()
        return alive

    @property
    def stdout(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def stderr(self) -> str:
        path = Path(str(self.log) + ".err")
        return path.read_text(errors="replace") if path.exists() else ""


def run_cli(args, log: Path, env: dict | None = None, timeout: float = 600) -> tuple[int, str, str, float]:
    """Run the CLI to its end in a child: (exit code, stdout, stderr, seconds)."""
    child = Child(args, log, env)
    code = child.wait(timeout)
    return code, child.stdout, child.stderr, time.perf_counter() - child.started


# -- what a user sees --------------------------------------------------------------------------------------


def is_progress(line: str) -> bool:
    """A tqdm progress line ('generate:  35%|███▌  | 7/20 ...'): a description, then a '|'."""
    head, bar, _ = line.partition("|")
    return bool(bar) and ":" in head or line.strip().endswith("it/s]") or line.strip().endswith("ex/s]")


def message_lines(stderr: str) -> list[str]:
    """The stderr lines a user reads as messages: progress bars (carriage-return redrawn) left out."""
    lines = []
    for line in stderr.replace("\r", "\n").splitlines():
        if line.strip() and not is_progress(line):
            lines.append(line)
    return lines


def tree_digest(*roots: Path, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """sha256 of every file under each root (and of each root that is a file), except under `skip`."""
    digests = {}
    for root in roots:
        root = Path(root)
        paths = [root] if root.is_file() else sorted(root.rglob("*")) if root.is_dir() else []
        for path in paths:
            if path.is_file() and not any(s == path or s in path.parents for s in skip):
                digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def record(kind: str, **fields) -> None:
    """Append one outcome to $RELIABILITY_RESULTS (read by `tests/reliability_report.py`)."""
    if not RESULTS:
        return
    Path(RESULTS).parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"kind": kind, **fields}) + "\n")


# -- comparing a resumed run with an uninterrupted one ---------------------------------------------------

# fields that legitimately differ between two runs of the same inputs (clock times, the run folder's path)
VOLATILE = {
    "started",
    "finished",
    "elapsed",
    "elapsed_s",
    "seconds",
    "duration",
    "duration_s",
    "time",
    "wall_s",
    "created",
    "timestamp",
    "out",
    "out_dir",
    "path",
    "packages",
    "examples_per_s",
    "tokens_per_s",
}


def _normal(value, places: int = 5):
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, places)
    if isinstance(value, dict):
        return {k: _normal(v, places) for k, v in sorted(value.items()) if k not in VOLATILE}
    if isinstance(value, (list, tuple)):
        return [_normal(v, places) for v in value]
    return value


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().decode("utf-8").splitlines() if line.strip()]


def _key(row: dict, keys: tuple[str, ...]) -> str:
    return json.dumps([row.get(k) for k in keys])


def _parquet_rows(folder: Path) -> list[dict]:
    import pyarrow.parquet as pq

    parts = sorted(folder.glob("part-*.parquet")) if folder.is_dir() else [folder]
    rows = []
    for part in parts:
        rows += pq.read_table(part).to_pylist()
    return rows


def compare(reference: Path, resumed: Path, artifacts: dict[str, tuple[str, ...] | None]) -> dict:
    """Lost, duplicated and differing records between two run folders.

    `artifacts` maps a file name to the fields that key its records (JSONL, or a parquet folder), or to
    None for a JSON file compared whole. A JSONL or parquet record counts as differing when a key is in
    both runs with other content; a JSON file that differs counts as one.
    """
    lost = duplicated = differing = 0
    details = []
    for name, keys in artifacts.items():
        ref_path, new_path = reference / name, resumed / name
        if keys is None:
            if not new_path.exists():
                lost += 1
                details.append(f"{name} missing")
            elif _normal(json.loads(ref_path.read_text())) != _normal(json.loads(new_path.read_text())):
                differing += 1
                details.append(f"{name} differs")
            continue
        read = _parquet_rows if name.endswith(".parquet") else _jsonl
        ref_rows = read(ref_path)
        new_rows = read(new_path) if new_path.exists() else []
        ref_map = {_key(r, keys): r for r in ref_rows}
        seen: dict[str, int] = {}
        for row in new_rows:
            seen[_key(row, keys)] = seen.get(_key(row, keys), 0) + 1
        missing = [k for k in ref_map if k not in seen]
        extra = [k for k, n in seen.items() if n > 1]
        lost += len(missing)
        duplicated += sum(seen[k] - 1 for k in extra)
        new_map = {_key(r, keys): r for r in new_rows}
        changed = [k for k in ref_map if k in new_map and _normal(ref_map[k]) != _normal(new_map[k])]
        differing += len(changed)
        if missing or extra or changed:
            details.append(f"{name}: lost {missing[:3]}, duplicated {extra[:3]}, differing {changed[:3]}")
    return {"lost": lost, "duplicated": duplicated, "differing": differing, "details": details}


def kill_trials(verb: str, args_for, artifacts: dict, workdir: Path, trials: int = TRIALS) -> list[dict]:
    """An uninterrupted reference run, then `trials` runs each SIGKILLed at a seeded random moment and
    re-run to completion; each compared with the reference. `args_for(out)` gives the CLI arguments."""
    workdir.mkdir(parents=True, exist_ok=True)
    reference = workdir / "reference"
    code, _, err, seconds = run_cli(args_for(reference), workdir / "reference.log")
    assert code == 0, f"{verb} reference run failed:\n{err[-3000:]}"
    outcomes = []
    for trial in range(trials):
        rng = random.Random(f"{verb}:{trial}")  # fixed seeds: the same kill moments on every run
        delay = rng.uniform(0.05, 1.0) * seconds
        out = workdir / f"trial-{trial:02d}"
        child = Child(args_for(out), workdir / f"trial-{trial:02d}-killed.log")
        time.sleep(delay)
        killed = child.kill()
        code, _, err, _ = run_cli(args_for(out), workdir / f"trial-{trial:02d}-resume.log")
        outcome = {
            "verb": verb,
            "trial": trial,
            "delay_s": round(delay, 2),
            "killed": killed,
            "exit": code,
            **(
                compare(reference, out, artifacts)
                if code == 0
                else {"lost": -1, "duplicated": -1, "differing": -1, "details": [err[-500:]]}
            ),
        }
        record("kill", **outcome)
        outcomes.append(outcome)
    return outcomes


# -- a small study on a tiny model: the inputs every verb needs ---------------------------------------------


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def build_study(root: Path, model: Path) -> Path:
    """generate + label (labels set by hand: a random tiny model never refuses) of 12 harmful and 12 harmless
    prompts, a prober, a heads ranking, and a run whose examples all complied (an empty refused group)."""
    root.mkdir(parents=True, exist_ok=True)

    def cli(*args):
        code, _, err, _ = run_cli(args, root / "logs" / f"{args[0]}-{len(list(root.glob('logs/*')))}.log")
        assert code == 0, f"{args}: {err[-3000:]}"

    (root / "logs").mkdir(exist_ok=True)
    for kind in ("harmful", "harmless"):
        prompts = write_jsonl(
            root / f"{kind}.jsonl",
            [{"id": f"{kind}-{i:02d}", "prompt": f"{kind} request number {i}"} for i in range(12)],
        )
        out = root / kind
        cli(
            "generate",
            "--model",
            model,
            "--prompts",
            prompts,
            "--max-thinking-tokens",
            10,
            "--max-answer-tokens",
            3,
            "--out",
            out,
        )
        cli("label", "--generations", out / "generations.jsonl", "--out", out)
        labels = _jsonl(out / "labels.jsonl")
        for index, label in enumerate(labels):
            label["refusal"] = kind == "harmful" and index % 3 != 0
        write_jsonl(out / "labels.jsonl", labels)
    complied = root / "complied"
    complied.mkdir()
    for name in ("generations.jsonl", "metadata.json"):
        (complied / name).write_bytes((root / "harmful" / name).read_bytes())
    write_jsonl(
        complied / "labels.jsonl",
        [{**label, "refusal": False} for label in _jsonl(root / "harmful" / "labels.jsonl")],
    )
    write_jsonl(
        root / "prompts16.jsonl",
        [{"id": f"p{i:02d}", "prompt": f"Tell me about item {i}."} for i in range(16)],
    )
    cli(
        "probe",
        "train",
        "--model",
        model,
        "--harmful",
        root / "harmful",
        "--harmless",
        root / "harmless",
        "--epochs",
        2,
        "--layer=-1",  # the last layer, counted from the end (recorded resolved in prober.json)
        "--out",
        root / "probe",
    )
    cli(
        "heads",
        "--model",
        model,
        "--prober",
        root / "probe",
        "--generations",
        root / "harmful" / "generations.jsonl",
        "--group",
        "all",
        "--out",
        root / "heads",
    )
    return root

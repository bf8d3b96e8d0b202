"""The reliability suite (issue 13, part 5); `pytest -m reliability` runs it alone.

- A catalogue of bad inputs across every verb (`reliability_catalogue.CASES`): each ends with exit 2,
  exactly one stderr line that is not a progress bar, no traceback, its inputs byte-identical and
  nothing written to its --out. A local model that gets loaded prints an INFO line, so one line also
  means every flag and input was checked before the model was loaded.
- kill -9 at seeded random moments for generate, trace, select, ablate, heads and evaluate: the
  re-run completes, nothing is lost or duplicated, and the artifacts equal an uninterrupted run's
  (greedy). `make test` runs RELIABILITY_TRIALS=2 per verb; `make reliability` runs 20 and prints
  the table (tests/reliability_report.py).
- Disk full: a small tmpfs (or, where it cannot be mounted, a file-size limit): the run fails with one
  line, and a re-run with space completes with nothing lost.

Every CLI run is a child forked from a fork server that imported torch once (reliability_lib.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest
import reliability_lib as lib
from reliability_catalogue import CASES

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def study(tiny_model_dir, tmp_path_factory):
    return lib.build_study(tmp_path_factory.mktemp("reliability-study"), Path(tiny_model_dir))


# -- the catalogue of bad inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_before_the_work_in_one_line(name, study, tiny_model_dir, tmp_path):
    case = CASES[name]
    ctx = {"root": study, "model": str(tiny_model_dir), "tmp": tmp_path, "out": tmp_path / "out"}
    with case.setup(ctx) as env:
        args = [str(a).format(**ctx) for a in case.args]
        # the verb's own --out (a full-disk or read-only case names one inside its mount)
        out = Path(args[args.index("--out") + 1]) if "--out" in args else Path(ctx["out"])
        out_before = lib.tree_digest(out) if out.exists() else None
        inputs_before = lib.tree_digest(study, tmp_path, skip=(out,))
        code, _, stderr, seconds = lib.run_cli(args, tmp_path.parent / f"{tmp_path.name}.log", env=env)
        lines = lib.message_lines(stderr)
        problems = []
        if code != case.exit:
            problems.append(f"exit {code}, expected {case.exit}")
        if "Traceback" in stderr:
            problems.append("a traceback")
        if case.exit != 0:  # an error: one line, before any work (a loaded model would have said so)
            if len(lines) != 1 or not lines[0].startswith("error: "):
                problems.append(f"{len(lines)} stderr lines, expected one 'error:' line")
        else:  # accepted with a warning (a torn last line): said once, and no error
            lines = [line for line in lines if any(needle in line for needle in case.needles)]
            if len(lines) != 1 or any("error" in line for line in lib.message_lines(stderr)):
                problems.append(
                    f"{len(lines)} warning lines naming {case.needles}, expected one and no error"
                )
        if lines and any(needle not in lines[0] for needle in case.needles):
            problems.append(f"the line does not name {case.needles}")
        if lib.tree_digest(study, tmp_path, skip=(out,)) != inputs_before:
            problems.append("an input changed")
        if case.exit == 2 and (lib.tree_digest(out) if out.exists() else None) != out_before:
            problems.append("--out changed")
        if case.max_seconds is not None and seconds > case.max_seconds:
            problems.append(f"took {seconds:.1f} s (at most {case.max_seconds} s)")
    lib.record(
        "bad_input",
        case=name,
        verb=case.verb,
        clean=not problems,
        problems=problems,
        seconds=round(seconds, 2),
    )
    assert not problems, f"{name}: {'; '.join(problems)}\n{stderr[-3000:]}"


def test_the_catalogue_covers_every_verb_and_the_issue_cases():
    verbs = {case.verb for case in CASES.values()}
    assert {
        "generate",
        "label",
        "probe train",
        "trace",
        "layers",
        "clip",
        "heads",
        "ablate",
        "select",
        "finetune",
        "evaluate",
        "report",
        "components",
        "guard",
    } <= verbs
    assert len(CASES) >= 40
    for must in (
        "select --k abc",
        "select --k 1.5",
        "select --k -2",
        "select --k 0",
        "select --k > n",
        "generate --out read-only",
        "generate --out is a file",
        "label binary generations",
        "label non-UTF-8 generations",
        "generate offline hub id",
        "generate unreachable hub endpoint",
        "generate zero-length prompt",
        "probe train same run twice",
        "probe train --layer 99",
        "heads empty --group",
        "label torn last line",
        "trace torn last line",
        # issue 21: one of each class
        "generate --config batch_size 0",
        "generate --config a key of another verb",
        "ablate --gamma nan",
        "generate --temperature nan",
        "probe train --lr nan",
        "generate CSV with prompt twice",
        "label null answer",
        "finetune --epochs 0",
        "report folder without stage artifacts",
        "generate semicolon CSV",
        "generate FIFO prompts",
        "generate /dev/zero prompts",
        "generate latin-1 CSV",
        "trace prober.json layer NaN",
        "label --overwrite while another run writes --out",
    ):
        assert must in CASES, must


def test_a_negative_layer_counts_from_the_end_and_is_recorded_resolved(study):
    """The study's prober was trained with --layer=-1 on a 2-layer model: prober.json says layer 1, and
    what was asked for."""
    prober = json.loads((study / "probe" / "prober.json").read_text())
    assert prober["layer"] == 1
    assert prober["config"]["layer_requested"] == -1
    from refusal_cliff.stages.probe import ProbeConfig

    help_text = next(f for f in fields(ProbeConfig) if f.name == "layer").metadata["help"]
    assert "negative counts from the end" in help_text


# -- kill -9 at random moments ------------------------------------------------------------------------------


def _kill_args(verb: str, study: Path, model: str):
    generations = study / "harmful" / "generations.jsonl"
    common = ["--model", model, "--device", "cpu"]
    return {
        "generate": (
            lambda out: [
                "generate",
                *common,
                "--prompts",
                study / "prompts16.jsonl",
                "--batch-size",
                2,
                "--max-thinking-tokens",
                16,
                "--max-answer-tokens",
                6,
                "--out",
                out,
            ],
            {"generations.jsonl": ("id",)},
        ),
        "trace": (
            lambda out: [
                "trace",
                *common,
                "--prober",
                study / "probe",
                "--generations",
                generations,
                "--harmless-generations",
                study / "harmless" / "generations.jsonl",
                "--batch-size",
                1,
                "--out",
                out,
            ],
            {"cliff.jsonl": ("id",), "traces.parquet": ("id", "position"), "curves.json": None},
        ),
        "select": (
            lambda out: [
                "select",
                *common,
                "--prober",
                study / "probe",
                "--candidates",
                "demo:candidates",
                "--limit",
                8,
                "--k",
                3,
                "--chunk-size",
                2,
                "--batch-size",
                2,
                "--max-thinking-tokens",
                8,
                "--max-answer-tokens",
                4,
                "--out",
                out,
            ],
            {"scores.jsonl": ("id",), "selection.jsonl": ("id",)},
        ),
        "ablate": (
            lambda out: [
                "ablate",
                *common,
                "--prober",
                study / "probe",
                "--heads",
                study / "heads" / "heads.json",
                "--prompts",
                study / "harmful.jsonl",
                "--limit",
                6,
                "--thresholds",
                "0.25,0.5",
                "--batch-size",
                2,
                "--max-thinking-tokens",
                8,
                "--max-answer-tokens",
                4,
                "--out",
                out,
            ],
            {
                "ablation_generations.jsonl": ("threshold", "control", "seed", "set", "id"),
                "ablation.json": None,
            },
        ),
        "heads": (
            lambda out: [
                "heads",
                *common,
                "--prober",
                study / "probe",
                "--generations",
                generations,
                "--group",
                "all",
                "--batch-size",
                1,
                "--out",
                out,
            ],
            {"heads.json": None},
        ),
        "evaluate": (
            lambda out: [
                "evaluate",
                "--model",
                f"tiny={model}",
                "--device",
                "cpu",
                "--harmful",
                study / "harmful.jsonl",
                "--benign",
                study / "harmless.jsonl",
                "--limit",
                6,
                "--batch-size",
                2,
                "--max-thinking-tokens",
                8,
                "--max-answer-tokens",
                4,
                "--out",
                out,
            ],
            {"evaluation.json": None},
        ),
    }[verb]


KILL_VERBS = ["generate", "trace", "select", "ablate", "heads", "evaluate"]


@pytest.mark.parametrize("verb", KILL_VERBS)
def test_kill_9_at_random_moments_loses_nothing(verb, study, tiny_model_dir, tmp_path):
    args_for, artifacts = _kill_args(verb, study, str(tiny_model_dir))
    outcomes = lib.kill_trials(verb, args_for, artifacts, tmp_path)
    bad = [o for o in outcomes if o["exit"] != 0 or o["lost"] or o["duplicated"] or o["differing"]]
    assert not bad, bad
    # the resumed folders hold no leftovers of the killed runs (temporary files, moved-aside backups)
    for outcome in outcomes:
        leftovers = [
            p.name
            for p in (tmp_path / f"trial-{outcome['trial']:02d}").rglob("*")
            if p.name.endswith(".tmp") or p.name.startswith(".replaced-")
        ]
        assert not leftovers, (outcome, leftovers)


# -- disk full ----------------------------------------------------------------------------------------------


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.environ.get("RELIABILITY_NO_TMPFS"):  # to exercise the ulimit -f fallback where mount works
        return False
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def _umount(folder: Path) -> None:
    subprocess.run(["umount", str(folder)], capture_output=True, timeout=10)


def test_disk_full_fails_in_one_line_and_resumes(study, tiny_model_dir, tmp_path):
    """The generations outgrow the disk part-way: one line, exit 2; with space again the re-run completes
    and equals an uninterrupted run."""
    args_for, artifacts = _kill_args("generate", study, str(tiny_model_dir))
    reference = tmp_path / "reference"
    code, _, err, _ = lib.run_cli(args_for(reference), tmp_path / "reference.log")
    assert code == 0, err
    size = (reference / "generations.jsonl").stat().st_size
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "64k")
    try:
        out = disk / "run"
        if mounted:  # fill the disk but for two pages of metadata and about half of the generations
            ballast = disk / "ballast"
            ballast.write_bytes(b"\0" * max(0, shutil.disk_usage(disk).free - 8192 - size // 2))
            env, method = {}, "tmpfs"
        else:  # a file-size limit (ulimit -f) in the child: a write past it fails with EFBIG
            out = tmp_path / "run"
            env, method = {"RELIABILITY_FSIZE": str(size // 2)}, "ulimit -f"
        code, _, stderr, _ = lib.run_cli(args_for(out), tmp_path / "full.log", env=env)
        lines = lib.message_lines(stderr)
        problems = []
        if code != 2 or "Traceback" in stderr:
            problems.append(f"exit {code}")
        if len([line for line in lines if not line.startswith("INFO ")]) != 1 or not lines[-1].startswith(
            "error: "
        ):
            problems.append(f"stderr {lines}")
        partial = (out / "generations.jsonl").read_bytes() if (out / "generations.jsonl").exists() else b""
        assert len(partial) < size, "the disk must fill part-way"
        if mounted:
            ballast.unlink()  # space freed
        code, _, stderr, _ = lib.run_cli(args_for(out), tmp_path / "resume.log")
        if code != 0:
            problems.append(f"re-run exit {code}: {stderr[-500:]}")
        comparison = (
            lib.compare(reference, out, artifacts)
            if code == 0
            else {"lost": -1, "duplicated": -1, "differing": -1}
        )
        lib.record(
            "disk_full",
            method=method,
            clean=not problems and not any(comparison[k] for k in ("lost", "duplicated", "differing")),
            problems=problems,
            **{k: comparison[k] for k in ("lost", "duplicated", "differing")},
        )
        assert not problems, problems
        assert comparison["lost"] == comparison["duplicated"] == comparison["differing"] == 0, comparison
    finally:
        if mounted:
            _umount(disk)

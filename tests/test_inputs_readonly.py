"""No verb writes to a path it was given as input: every input file (prompts, generations.jsonl,
labels.jsonl, the prober, heads.json) hashes the same after generate -> label -> probe train -> trace ->
heads -> report as before, and so does every file outside the verb's --out. A generations.jsonl with a
torn last line is read by `label` and `trace` without being cut: repairs belong to its writer, on resume."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from refusal_cliff.cli import main

pytestmark = pytest.mark.slow

TORN = b'{"id": "harmful-torn", "prompt": "a write killed mid-li'


def _hashes(root: Path, skip: Path | None = None) -> dict[str, str]:
    """sha256 of every file under `root`, except those under `skip` (the verb's own --out)."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and not (skip is not None and skip in path.parents)
    }


def _run(root: Path, *args, inputs: list[Path], out: Path | None = None):
    """Run one verb; assert it succeeded, that its inputs are unchanged and that nothing outside `out`
    changed (for `label`, whose --out is the generation run itself, only the inputs are checked)."""
    inputs = [Path(p) for p in inputs]
    assert inputs and all(p.is_file() for p in inputs), inputs
    before_inputs = {p: p.read_bytes() for p in inputs}
    before = _hashes(root, skip=out) if out is not None else None
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    for path, content in before_inputs.items():
        assert path.read_bytes() == content, f"{args[0]} rewrote its input {path}"
    if before is not None:
        after = _hashes(root, skip=out)
        assert {k: v for k, v in after.items() if k in before} == before, f"{args[0]} wrote outside --out"
    return result


def test_no_verb_rewrites_its_inputs(tiny_model_dir, tmp_path):
    root = tmp_path
    model = str(tiny_model_dir)
    for kind in ("harmful", "harmless"):
        prompts = root / f"{kind}.jsonl"
        prompts.write_text(
            "".join(
                json.dumps({"id": f"{kind}-{i}", "prompt": f"{kind} request number {i}"}) + "\n"
                for i in range(8)
            )
        )
        out = root / kind
        _run(
            root,
            "generate",
            "--model",
            model,
            "--prompts",
            prompts,
            "--max-thinking-tokens",
            10,
            "--max-answer-tokens",
            4,
            "--out",
            out,
            inputs=[prompts],
            out=out,
        )
        _run(
            root,
            "label",
            "--generations",
            out / "generations.jsonl",
            "--out",
            out,
            inputs=[out / "generations.jsonl", prompts],
        )
        if kind == "harmful":  # a random tiny model never refuses: make some answers refusals, by hand
            labels = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
            for index, label in enumerate(labels):
                label["refusal"] = index % 3 != 0
            (out / "labels.jsonl").write_text("".join(json.dumps(label) + "\n" for label in labels))

    runs = [root / "harmful", root / "harmless"]
    run_files = [
        run / name for run in runs for name in ("generations.jsonl", "labels.jsonl", "metadata.json")
    ]
    _run(
        root,
        "probe",
        "train",
        "--model",
        model,
        "--harmful",
        runs[0],
        "--harmless",
        runs[1],
        "--epochs",
        2,
        "--out",
        root / "probe",
        inputs=run_files,
        out=root / "probe",
    )
    prober_files = [p for p in (root / "probe").iterdir() if p.is_file()]
    _run(
        root,
        "trace",
        "--model",
        model,
        "--prober",
        root / "probe" / "prober.safetensors",
        "--generations",
        runs[0] / "generations.jsonl",
        "--harmless-generations",
        runs[1] / "generations.jsonl",
        "--out",
        root / "trace",
        inputs=[*run_files, *prober_files],
        out=root / "trace",
    )
    _run(
        root,
        "heads",
        "--model",
        model,
        "--prober",
        root / "probe",
        "--generations",
        runs[0] / "generations.jsonl",
        "--group",
        "all",
        "--out",
        root / "heads",
        inputs=[*run_files, *prober_files],
        out=root / "heads",
    )
    heads = root / "heads" / "heads.json"
    everything = [p for p in root.rglob("*") if p.is_file()]
    assert heads in everything
    before = _hashes(root)
    result = CliRunner().invoke(main, ["report", "--run", str(root)])
    assert result.exit_code == 0, result.output
    after = _hashes(root)
    assert {k: v for k, v in after.items() if k in before} == before, "report changed one of its inputs"

    # a torn last line (a killed `generate`) in a run given as input to label and trace
    torn = root / "torn"
    torn.mkdir()
    for name in ("generations.jsonl", "labels.jsonl", "metadata.json"):
        shutil.copy(runs[0] / name, torn / name)
    with open(torn / "generations.jsonl", "ab") as handle:
        handle.write(TORN)
    torn_files = [torn / name for name in ("generations.jsonl", "labels.jsonl", "metadata.json")]
    _run(
        root,
        "label",
        "--generations",
        torn / "generations.jsonl",
        "--out",
        root / "torn-labels",
        inputs=torn_files,
        out=root / "torn-labels",
    )
    _run(
        root,
        "trace",
        "--model",
        model,
        "--prober",
        root / "probe",
        "--generations",
        torn / "generations.jsonl",
        "--out",
        root / "torn-trace",
        inputs=[*torn_files, *prober_files],
        out=root / "torn-trace",
    )
    assert (torn / "generations.jsonl").read_bytes().endswith(TORN)
    labelled = (root / "torn-labels" / "labels.jsonl").read_text().splitlines()
    assert len(labelled) == 8  # the torn record is skipped, not labelled

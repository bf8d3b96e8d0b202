"""Findings of the new-user trial (issue 15): every verb reads exactly the files it is given, a failed
`--overwrite` loses nothing, an unreliable prober is said so everywhere, hints run as printed."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import sys

import pytest
from click.testing import CliRunner

from refusal_cliff.cli import main
from refusal_cliff.core.runs import read_jsonl

pytestmark = pytest.mark.slow


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _snapshot(folder):
    """Every file under a folder with its bytes' digest (what a failed run must leave unchanged)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def study(tiny_model_dir, tmp_path_factory):
    """generate + label on a tiny model (labels set by hand), a prober, a trace and a selection."""
    root = tmp_path_factory.mktemp("trial")
    for kind in ("harmful", "harmless"):
        prompts = _write_jsonl(
            root / f"{kind}.jsonl",
            [{"id": f"{kind}-{i}", "prompt": f"{kind} request number {i}"} for i in range(12)],
        )
        out = root / kind
        assert (
            _invoke(
                "generate",
                "--model",
                tiny_model_dir,
                "--prompts",
                prompts,
                "--max-thinking-tokens",
                10,
                "--max-answer-tokens",
                3,
                "--out",
                out,
            ).exit_code
            == 0
        )
        assert _invoke("label", "--generations", out / "generations.jsonl", "--out", out).exit_code == 0
        labels = read_jsonl(out / "labels.jsonl")
        for index, label in enumerate(labels):  # a random tiny model never refuses: set the classes by hand
            label["refusal"] = kind == "harmful" and index % 3 != 0
        _write_jsonl(out / "labels.jsonl", labels)
    result = _invoke(
        "probe",
        "train",
        "--model",
        tiny_model_dir,
        "--harmful",
        root / "harmful",
        "--harmless",
        root / "harmless",
        "--epochs",
        2,
        "--out",
        root / "probe",
    )
    assert result.exit_code == 0, result.output
    result = _invoke(
        "trace",
        "--model",
        tiny_model_dir,
        "--prober",
        root / "probe",
        "--generations",
        root / "harmful" / "generations.jsonl",
        "--out",
        root / "trace",
    )
    assert result.exit_code == 0, result.output
    result = _invoke(
        "select",
        "--model",
        tiny_model_dir,
        "--prober",
        root / "probe",
        "--candidates",
        "demo:candidates",
        "--limit",
        3,
        "--k",
        2,
        "--max-thinking-tokens",
        4,
        "--max-answer-tokens",
        2,
        "--out",
        root / "select",
    )
    assert result.exit_code == 0, result.output
    return root


def test_trace_reads_exactly_the_file_it_is_given(study, tiny_model_dir):
    """A filtered copy beside the full generations.jsonl: only its ids are traced."""
    records = read_jsonl(study / "harmful" / "generations.jsonl")
    subset = _write_jsonl(study / "harmful" / "subset.jsonl", records[2:5])
    out = study / "trace-subset"
    result = _invoke(
        "trace", "--model", tiny_model_dir, "--prober", study / "probe", "--generations", subset, "--out", out
    )
    assert result.exit_code == 0, result.output
    assert [row["id"] for row in read_jsonl(out / "cliff.jsonl")] == [r["id"] for r in records[2:5]]


def test_labels_beside_a_file_that_do_not_cover_it_are_not_used(study, tiny_model_dir, tmp_path):
    folder = tmp_path / "partial"
    folder.mkdir()
    shutil.copy(study / "harmful" / "generations.jsonl", folder / "generations.jsonl")
    _write_jsonl(folder / "labels.jsonl", read_jsonl(study / "harmful" / "labels.jsonl")[:4])
    result = _invoke(
        "trace",
        "--model",
        tiny_model_dir,
        "--prober",
        study / "probe",
        "--generations",
        folder / "generations.jsonl",
        "--out",
        tmp_path / "t",
    )
    assert result.exit_code == 2 and "does not label every example" in result.output
    assert not (tmp_path / "t").exists()


def test_the_label_hint_runs_as_printed(study, tiny_model_dir, tmp_path):
    folder = tmp_path / "nolabels"
    folder.mkdir()
    shutil.copy(study / "harmful" / "generations.jsonl", folder / "generations.jsonl")
    result = _invoke(
        "trace",
        "--model",
        tiny_model_dir,
        "--prober",
        study / "probe",
        "--generations",
        folder / "generations.jsonl",
        "--out",
        tmp_path / "t",
    )
    assert result.exit_code == 2
    hint = re.search(r"`(refusal-cliff label [^`]+)`", result.output).group(1)
    rerun = CliRunner().invoke(main, shlex.split(hint)[1:])
    assert rerun.exit_code == 0, rerun.output
    result = _invoke(
        "trace",
        "--model",
        tiny_model_dir,
        "--prober",
        study / "probe",
        "--generations",
        folder / "generations.jsonl",
        "--out",
        tmp_path / "t",
    )
    assert result.exit_code == 0, result.output


LATE_BAD_INPUTS = {
    "probe --layer 99": (
        "probe",
        [
            "probe",
            "train",
            "--harmful",
            "{root}/harmful",
            "--harmless",
            "{root}/harmless",
            "--layer",
            "99",
            "--epochs",
            "2",
        ],
    ),
    "probe one class": (
        "probe",
        ["probe", "train", "--harmful", "{root}/harmful", "--harmless", "{root}/harmful2", "--epochs", "2"],
    ),
    "trace duplicate ids": (
        "trace",
        [
            "trace",
            "--prober",
            "{root}/probe",
            "--generations",
            "{root}/harmful/generations.jsonl",
            "--generations",
            "{root}/harmful/generations.jsonl",
        ],
    ),
    "select --k abc": (
        "select",
        [
            "select",
            "--prober",
            "{root}/probe",
            "--candidates",
            "demo:candidates",
            "--limit",
            "3",
            "--k",
            "abc",
        ],
    ),
    "select --k 1.5": (
        "select",
        [
            "select",
            "--prober",
            "{root}/probe",
            "--candidates",
            "demo:candidates",
            "--limit",
            "3",
            "--k",
            "1.5",
        ],
    ),
    "select --k -2": (
        "select",
        ["select", "--prober", "{root}/probe", "--candidates", "demo:candidates", "--limit", "3", "--k=-2"],
    ),
    "select --k 0": (
        "select",
        ["select", "--prober", "{root}/probe", "--candidates", "demo:candidates", "--limit", "3", "--k", "0"],
    ),
    "select --k 9 of 3": (
        "select",
        ["select", "--prober", "{root}/probe", "--candidates", "demo:candidates", "--limit", "3", "--k", "9"],
    ),
}


@pytest.mark.parametrize("case", list(LATE_BAD_INPUTS))
def test_overwrite_with_a_bad_input_keeps_the_earlier_results_byte_for_byte(study, tiny_model_dir, case):
    folder, args = LATE_BAD_INPUTS[case]
    if not (study / "harmful2").exists():  # a second run with refusals only: no class 0 at all
        shutil.copytree(study / "harmful", study / "harmful2")
        _write_jsonl(
            study / "harmful2" / "labels.jsonl",
            [{**label, "refusal": True} for label in read_jsonl(study / "harmful" / "labels.jsonl")],
        )
    before = _snapshot(study / folder)
    args = [a.format(root=study) for a in args]
    result = _invoke(*args, "--model", tiny_model_dir, "--out", study / folder, "--overwrite")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert _snapshot(study / folder) == before


def test_an_unreliable_prober_is_flagged_downstream(study):
    prober = json.loads((study / "probe" / "prober.json").read_text())
    assert prober["quality"] == "unreliable" and prober["metrics"]["n_val"] < 20
    low, high = prober["metrics"]["val_accuracy_ci95"]
    assert 0 <= low <= prober["metrics"]["val_accuracy"] <= high <= 1
    for stage in ("trace/metadata.json", "select/metadata.json", "select/metadata.select.json"):
        assert json.loads((study / stage).read_text())["prober"]["quality"] == "unreliable", stage
    result = _invoke("report", "--run", study)
    assert result.exit_code == 0, result.output
    html = (study / "report.html").read_text()
    assert "unreliable" in html.lower()


def test_candidates_are_named_like_generate_names_prompts(tmp_path):
    from refusal_cliff.stages.select import load_candidates

    path = _write_jsonl(tmp_path / "wild.jsonl", [{"prompt": f"p{i}", "response": "no"} for i in range(3)])
    assert [c["id"] for c in load_candidates(str(path))] == ["wild-0", "wild-1", "wild-2"]


def test_artifacts_get_the_mode_of_a_normal_file(study):
    umask = os.umask(0)
    os.umask(umask)
    for name in (
        "probe/prober.safetensors",
        "probe/prober.json",
        "trace/cliff.jsonl",
        "harmful/generations.jsonl",
        "select/scores.jsonl",
    ):
        assert (study / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_export_threshold_must_be_measured(study, tiny_model_dir, tmp_path):
    heads = _invoke(
        "heads",
        "--model",
        tiny_model_dir,
        "--prober",
        study / "probe",
        "--generations",
        study / "harmful" / "generations.jsonl",
        "--out",
        tmp_path / "heads",
    )
    assert heads.exit_code == 0, heads.output
    result = _invoke(
        "ablate",
        "--model",
        tiny_model_dir,
        "--prober",
        study / "probe",
        "--heads",
        tmp_path / "heads" / "heads.json",
        "--prompts",
        study / "harmful.jsonl",
        "--thresholds",
        "0.25",
        "--export",
        tmp_path / "export",
        "--export-threshold",
        "0.5",
        "--out",
        tmp_path / "ablate",
    )
    assert result.exit_code == 2 and "was not measured" in result.output
    assert not (tmp_path / "ablate").exists() and not (tmp_path / "export").exists()


def test_ablate_shows_one_overall_bar(study, tiny_model_dir, tmp_path):
    from refusal_cliff.compute.prober import load_prober
    from refusal_cliff.core.config import GenerationConfig
    from refusal_cliff.core.data import load_prompts
    from refusal_cliff.core.models import load_model
    from refusal_cliff.stages.ablate import AblateConfig, run_ablate

    heads = _invoke(
        "heads",
        "--model",
        tiny_model_dir,
        "--prober",
        study / "probe",
        "--group",
        "all",
        "--generations",
        study / "harmful" / "generations.jsonl",
        "--out",
        tmp_path / "heads",
    )
    assert heads.exit_code == 0, heads.output
    loaded = load_model(str(tiny_model_dir), device="cpu")
    prober = load_prober(study / "probe", loaded)
    bars = []

    import tqdm.auto

    original = tqdm.auto.tqdm

    class Recording(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if not kwargs.get("disable"):
                bars.append(self)

    # the package imports tqdm at the top of each module that shows a bar: replace every binding
    bound = [
        m
        for n, m in list(sys.modules.items())
        if n.startswith("refusal_cliff") and getattr(m, "tqdm", None) is original
    ]
    tqdm.auto.tqdm = Recording
    for module in bound:
        module.tqdm = Recording
    try:
        run_ablate(
            loaded,
            prober,
            tmp_path / "heads" / "heads.json",
            load_prompts(str(study / "harmful.jsonl"), limit=2),
            tmp_path / "ablate",
            AblateConfig(thresholds=(0.125, 0.25)),
            GenerationConfig(max_thinking_tokens=3, max_answer_tokens=2),
            benign_prompts=load_prompts(str(study / "harmless.jsonl"), limit=3),
        )
    finally:
        tqdm.auto.tqdm = original
        for module in bound:
            module.tqdm = original
    shown = bars  # a closed bar reads disable=True: the bars shown were recorded when created
    assert len(shown) == 1
    assert (
        shown[0].total == 3 * (2 + 3) and shown[0].n == shown[0].total
    )  # (baseline + 2 thresholds) x examples
    assert "0.25" in shown[0].desc

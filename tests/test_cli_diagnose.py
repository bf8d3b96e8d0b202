"""The diagnosis verbs end to end on a tiny model: generate -> label -> probe train -> trace -> report."""

import json

import pytest
from click.testing import CliRunner

from refusal_cliff.cli import main
from refusal_cliff.core.runs import read_jsonl

pytestmark = pytest.mark.slow


def _invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("diagnose")
    prompts = {}
    for kind in ("harmful", "harmless"):
        path = root / f"{kind}.jsonl"
        path.write_text(
            "".join(
                json.dumps({"id": f"{kind}-{i}", "prompt": f"{kind} request number {i}"}) + "\n"
                for i in range(12)
            )
        )
        prompts[kind] = path
        out = root / kind
        result = _invoke(
            "generate",
            "--model",
            tiny_model_dir,
            "--prompts",
            path,
            "--max-thinking-tokens",
            12,
            "--max-answer-tokens",
            4,
            "--out",
            out,
        )
        assert result.exit_code == 0, result.output
        result = _invoke("label", "--generations", out / "generations.jsonl", "--out", out)
        assert result.exit_code == 0, result.output
        # a random tiny model never refuses: make half the harmful answers refusals, by hand
        if kind == "harmful":
            labels = read_jsonl(out / "labels.jsonl")
            for index, label in enumerate(labels):
                label["refusal"] = index % 3 != 0
            (out / "labels.jsonl").write_text("".join(json.dumps(label) + "\n" for label in labels))
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
        3,
        "--out",
        root / "probe",
    )
    assert result.exit_code == 0, result.output
    return root


def test_probe_train_trace_report(runs, tiny_model_dir):
    probe = runs / "probe"
    meta = json.loads((probe / "prober.json").read_text())
    assert meta["layer"] == 1 and meta["d_model"] == 64 and len(meta["history"]) == 3
    again = _invoke(
        "probe",
        "train",
        "--model",
        tiny_model_dir,
        "--harmful",
        runs / "harmful",
        "--harmless",
        runs / "harmless",
        "--epochs",
        3,
        "--out",
        probe,
    )
    assert "up to date" in again.output

    trace = runs / "trace"
    result = _invoke(
        "trace",
        "--model",
        tiny_model_dir,
        "--prober",
        probe / "prober.safetensors",
        "--generations",
        runs / "harmful" / "generations.jsonl",
        "--harmless-generations",
        runs / "harmless" / "generations.jsonl",
        "--out",
        trace,
    )
    assert result.exit_code == 0, result.output
    cliff = read_jsonl(trace / "cliff.jsonl")
    assert len(cliff) == 24
    assert {row["group"] for row in cliff} == {"harmful_complied", "harmful_refused", "harmless"}
    for row in cliff:
        assert set(row) >= {"id", "plateau", "final", "ms", "t_cliff", "drop"}
    import pyarrow.parquet as pq

    table = pq.read_table(trace / "traces.parquet")
    assert set(table.column_names) >= {"id", "position", "token_id", "token", "region", "score"}
    curves = json.loads((trace / "curves.json").read_text())
    assert len(curves["harmless"]["mean"]) == 101

    result = _invoke("report", "--run", runs)
    assert result.exit_code == 0, result.output
    assert (runs / "report.html").is_file()


def test_prober_for_another_model_is_rejected(runs, tmp_path, smol_tokenizer):
    from conftest import make_tiny_model

    other = tmp_path / "other"
    make_tiny_model("Qwen2ForCausalLM", hidden_size=32, intermediate_size=64, head_dim=8).save_pretrained(
        other
    )
    smol_tokenizer.save_pretrained(other)
    result = CliRunner().invoke(
        main,
        [
            "trace",
            "--model",
            str(other),
            "--prober",
            str(runs / "probe"),
            "--generations",
            str(runs / "harmful" / "generations.jsonl"),
            "--out",
            str(tmp_path / "t"),
        ],
    )
    assert result.exit_code == 2
    assert "prober" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "t" / "cliff.jsonl").exists()


def test_probe_train_needs_labels(runs, tiny_model_dir, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "probe",
            "train",
            "--model",
            str(tiny_model_dir),
            "--harmful",
            str(tmp_path),
            "--harmless",
            str(runs / "harmless"),
            "--out",
            str(tmp_path / "p"),
        ],
    )
    assert result.exit_code == 2 and "generations.jsonl" in result.output


def test_layer_and_clipping_studies(runs, tiny_model_dir):
    result = _invoke(
        "layers",
        "--model",
        tiny_model_dir,
        "--harmful",
        runs / "harmful",
        "--harmless",
        runs / "harmless",
        "--layers",
        "0",
        "--epochs",
        2,
        "--out",
        runs / "layers",
    )
    assert result.exit_code == 0, result.output
    layerwise = json.loads((runs / "layers" / "layerwise.json").read_text())
    assert set(layerwise) == {"0", "1"}  # the asked layer and the last one
    assert len(layerwise["1"]["harmless"]["mean"]) == 101
    assert (runs / "layers" / "layer_00" / "prober.safetensors").is_file()

    result = _invoke(
        "clip",
        "--model",
        tiny_model_dir,
        "--prober",
        runs / "probe",
        "--generations",
        runs / "harmful" / "generations.jsonl",
        "--fractions",
        "0,0.5,1",
        "--limit",
        4,
        "--max-answer-tokens",
        3,
        "--out",
        runs / "clip",
    )
    assert result.exit_code == 0, result.output
    clipping = json.loads((runs / "clip" / "clipping.json").read_text())
    assert [row["fraction"] for row in clipping] == [0.0, 0.5, 1.0] and all(row["n"] == 4 for row in clipping)
    assert clipping[0]["ms_mean"] is None  # no thinking left: the plateau is undefined

    bad = CliRunner().invoke(
        main,
        [
            "clip",
            "--prober",
            str(runs / "probe"),
            "--generations",
            str(runs / "harmful" / "generations.jsonl"),
            "--fractions",
            "0,2",
            "--out",
            str(runs / "clip2"),
        ],
    )
    assert bad.exit_code == 2 and "[0, 1]" in bad.output

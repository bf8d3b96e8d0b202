import json

import pytest

from refusal_cliff.errors import UserError
from refusal_cliff.runs import JsonlWriter, RunFolder, completed_ids, read_jsonl


def test_writer_repairs_a_torn_line_and_a_missing_newline(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b')  # killed mid-write
    with JsonlWriter(path) as writer:
        writer.write({"id": "c"})
    assert [r["id"] for r in read_jsonl(path)] == ["a", "c"]
    path.write_text('{"id": "a"}\n{"id": "b"}')  # complete record, newline not yet written
    with JsonlWriter(path) as writer:
        writer.write({"id": "c"})
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]


def test_a_bad_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(UserError, match="line 2"):
        read_jsonl(path)


def test_completed_ids(tmp_path):
    path = tmp_path / "a.jsonl"
    assert completed_ids(path) == set()
    path.write_text('{"id": 1}\n{"id": "x"}\n{"id": "y", ')
    assert completed_ids(path) == {"1", "x"}
    assert path.read_text() == '{"id": 1}\n{"id": "x"}\n'


def test_run_folder_fingerprints(tmp_path):
    run = RunFolder(tmp_path, "generate", {"a": 1})
    assert run.start(model_id="m", artifacts=["out.jsonl"]) is False
    (tmp_path / "out.jsonl").write_text("{}\n")
    run.finish()
    assert RunFolder(tmp_path, "generate", {"a": 1}).is_finished()
    assert RunFolder(tmp_path, "generate", {"a": 1}).start(artifacts=["out.jsonl"]) is True
    with pytest.raises(UserError, match="--overwrite"):
        RunFolder(tmp_path, "generate", {"a": 2}).start(artifacts=["out.jsonl"])
    assert (tmp_path / "out.jsonl").exists()  # nothing lost
    RunFolder(tmp_path, "generate", {"a": 2}, overwrite=True).start(artifacts=["out.jsonl"])
    assert not (tmp_path / "out.jsonl").exists()
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["schema_version"] == 1 and meta["config"] == {"a": 2} and "packages" in meta


def test_an_unfinished_run_without_artifacts_does_not_lock_the_folder(tmp_path):
    RunFolder(tmp_path, "probe", {"a": 1}).start(artifacts=["prober.safetensors"])  # failed before writing
    RunFolder(tmp_path, "probe", {"a": 2}).start(artifacts=["prober.safetensors"])


def test_second_stage_in_a_folder_gets_its_own_metadata(tmp_path):
    RunFolder(tmp_path, "generate", {"a": 1}).start()
    RunFolder(tmp_path, "label", {"b": 1}).start()
    assert json.loads((tmp_path / "metadata.json").read_text())["stage"] == "generate"
    assert json.loads((tmp_path / "metadata.label.json").read_text())["stage"] == "label"

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from refusal_cliff.core.errors import UserError
from refusal_cliff.core.runs import LOCK_NAME, JsonlWriter, RunFolder, completed_ids, read_jsonl


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
    assert run.start(model_id="m", artifacts=["out.jsonl"]).resumed is False
    (tmp_path / "out.jsonl").write_text("{}\n")
    run.finish()
    assert RunFolder(tmp_path, "generate", {"a": 1}).is_finished()
    assert RunFolder(tmp_path, "generate", {"a": 1}).start(artifacts=["out.jsonl"]).resumed is True
    with pytest.raises(UserError, match="--overwrite"):
        RunFolder(tmp_path, "generate", {"a": 2}).start(artifacts=["out.jsonl"])
    assert (tmp_path / "out.jsonl").exists()  # nothing lost
    replacing = RunFolder(tmp_path, "generate", {"a": 2}, overwrite=True).start(artifacts=["out.jsonl"])
    assert not (tmp_path / "out.jsonl").exists()
    replacing.finish()
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["schema_version"] == 1 and meta["config"] == {"a": 2} and "packages" in meta
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".replaced-")]  # the old run is gone


def test_a_failed_overwrite_restores_the_earlier_run_byte_for_byte(tmp_path):
    run = RunFolder(tmp_path, "trace", {"a": 1}, artifacts=["cliff.jsonl", "traces.parquet"])
    with run.start():
        (tmp_path / "cliff.jsonl").write_text('{"id": "old"}\n')
        (tmp_path / "traces.parquet").mkdir()
        (tmp_path / "traces.parquet" / "part-00000.parquet").write_bytes(b"old part")
        run.finish()
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="late"):
        with RunFolder(
            tmp_path,
            "trace",
            {"a": 2},
            overwrite=True,
            artifacts=["cliff.jsonl", "traces.parquet", "curves.json"],
        ).start():
            (tmp_path / "cliff.jsonl").write_text('{"id": "new"}\n')
            (tmp_path / "curves.json").write_text("{}")
            raise UserError("a bad input found late")
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


def test_a_torn_line_cut_inside_a_multibyte_character_is_repaired(tmp_path):
    path = tmp_path / "a.jsonl"
    line = json.dumps({"id": "b", "text": "café ünïcödé"}, ensure_ascii=False).encode()
    cut = line.index("é".encode()) + 1  # inside the two bytes of é
    path.write_bytes(b'{"id": "a"}\n' + line[:cut])
    assert [r["id"] for r in read_jsonl(path)] == ["a"]  # a reader drops it and leaves the file alone
    assert path.read_bytes().endswith(line[:cut])
    with JsonlWriter(path) as writer:  # the writer repairs its own file
        writer.write({"id": "c"})
    assert [r["id"] for r in read_jsonl(path)] == ["a", "c"]


def test_an_unfinished_run_without_artifacts_does_not_lock_the_folder(tmp_path):
    RunFolder(tmp_path, "probe", {"a": 1}).start(artifacts=["prober.safetensors"])  # failed before writing
    RunFolder(tmp_path, "probe", {"a": 2}).start(artifacts=["prober.safetensors"])


def test_second_stage_in_a_folder_gets_its_own_metadata(tmp_path):
    RunFolder(tmp_path, "generate", {"a": 1}).start()
    RunFolder(tmp_path, "label", {"b": 1}).start()
    assert json.loads((tmp_path / "metadata.json").read_text())["stage"] == "generate"
    assert json.loads((tmp_path / "metadata.label.json").read_text())["stage"] == "label"


def test_metadata_json_is_strict_json_even_when_a_value_is_nan(tmp_path):
    run = RunFolder(tmp_path, "probe", {"lr": float("nan")})
    with run.start(extra={"score": float("inf")}):
        run.finish(extra={"accuracy": float("nan")})
    text = (tmp_path / "metadata.json").read_text()
    metadata = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in metadata.json"))
    assert metadata["config"]["lr"] is None and metadata["score"] is None and metadata["accuracy"] is None


_HOLDER = """
import sys, time
from refusal_cliff.core.runs import RunFolder
RunFolder(sys.argv[1], "label", {"a": 1}, overwrite=True).start()
print("locked", flush=True)
time.sleep(60)
"""


def _holder(folder):
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "locked"
    return process


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_second_writer_is_refused_at_once_naming_the_first(tmp_path, overwrite):
    first = _holder(tmp_path)
    try:
        started = time.monotonic()
        with pytest.raises(
            UserError, match=f"being written by another refusal-cliff run \\(pid {first.pid}\\)"
        ):
            RunFolder(tmp_path, "label", {"a": 2}, overwrite=overwrite).start()
        assert time.monotonic() - started < 5  # at once, not after a wait
    finally:
        first.kill()
        first.wait()


def test_a_lock_left_by_a_killed_run_does_not_block_the_next(tmp_path):
    first = _holder(tmp_path)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert (tmp_path / LOCK_NAME).exists()  # the file is left behind; its fcntl lock died with the process
    with RunFolder(tmp_path, "label", {"a": 1}, overwrite=True).start() as run:
        run.finish()
    assert json.loads((tmp_path / "metadata.json").read_text())["finished"]


def test_stages_of_one_process_share_the_folder_lock(tmp_path):
    outer = RunFolder(tmp_path, "generate", {"a": 1}).start()
    with RunFolder(tmp_path, "label", {"b": 1}).start() as inner:  # nested in the same process: allowed
        inner.finish()
    outer.finish()

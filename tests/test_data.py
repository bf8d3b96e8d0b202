import json
import os

import pytest

from refusal_cliff.core.data import load_prompts
from refusal_cliff.core.errors import UserError

SHARED = "../shared/data"


def test_demo_sets():
    harmful, harmless = load_prompts("demo:harmful"), load_prompts("demo:harmless")
    assert len(harmful) >= 24 and len(harmless) >= 24
    assert len({p["id"] for p in harmful + harmless}) == len(harmful) + len(harmless)


@pytest.mark.parametrize(
    "name, column",
    [
        ("prompt", "prompt"),
        ("Goal", "Goal"),
        ("instruction", "instruction"),
        ("forbidden_prompt", "forbidden_prompt"),
        ("QUESTION", "QUESTION"),
        ("vanilla", "vanilla"),
    ],
)
def test_column_detection_csv(tmp_path, name, column):
    path = tmp_path / "p.csv"
    path.write_text(f"other,{name}\nx,hello\ny,world\n")
    prompts = load_prompts(str(path))
    assert [p["prompt"] for p in prompts] == ["hello", "world"] and prompts[0]["other"] == "x"
    assert [p["id"] for p in prompts] == ["p-0", "p-1"]


def test_formats(tmp_path):
    rows = [{"id": "a", "instruction": "one"}, {"id": "b", "instruction": "two"}]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    for name in ("p.json", "p.jsonl", "p.parquet", "p.txt"):
        assert [p["prompt"] for p in load_prompts(str(tmp_path / name))] == ["one", "two"]
    assert [p["id"] for p in load_prompts(str(tmp_path / "p.jsonl"))] == ["a", "b"]
    assert len(load_prompts(str(tmp_path / "p.jsonl"), limit=1)) == 1


def test_explicit_column(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"class": "x", "data": "hello"}]))
    assert load_prompts(str(path), column="data")[0]["prompt"] == "hello"
    with pytest.raises(UserError, match="no column 'nope'"):
        load_prompts(str(path), column="nope")
    with pytest.raises(UserError, match="--column"):
        load_prompts(str(path))


@pytest.mark.parametrize("content, match", [("", "empty"), ("[1, 2", "not valid JSON"), ('{"a": 1}', "list")])
def test_bad_files(tmp_path, content, match):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(UserError, match=match):
        load_prompts(str(path))


def test_empty_csv_has_no_prompts(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt\n")
    with pytest.raises(UserError, match="no prompts"):
        load_prompts(str(path))


def test_missing_file():
    with pytest.raises(UserError, match="not found"):
        load_prompts("/no/such/prompts.csv")


@pytest.mark.parametrize(
    "relative",
    [
        "advbench/harmful_behaviors.csv",
        "jailbreakbench/benign-behaviors.csv",
        "strongreject/strongreject_small_dataset.csv",
        "refusal_direction/splits/harmful_val.json",
        "alpaca/seed_tasks.jsonl",
    ],
)
def test_shared_benchmark_files(relative):
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / relative
    if not path.exists():
        pytest.skip(f"{path} is not present on this machine")
    prompts = load_prompts(str(path))
    assert len(prompts) > 10 and all(p["prompt"].strip() for p in prompts)


def test_csv_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes("\ufeffprompt,x\nhello,1\n".encode("utf-8"))
    assert load_prompts(str(path))[0]["prompt"] == "hello"


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"id,prompt,prompt\n1,first,second\n", "names the column 'prompt' twice"),
        (b"id,Prompt,prompt\n1,first,second\n", "twice"),
        (b"id;prompt\n1;hello\n", "separated by semicolons, not commas"),
        (b"id\tprompt\n1\thello\n", "separated by tabs, not commas"),
        ("prompt\ncaf\u00e9\n".encode("latin-1"), "not UTF-8 text"),
        (b"id,prompt\n1,hello, world\n", "line 2 has 3 fields but the header has 2"),
    ],
)
def test_a_csv_read_wrong_is_refused_with_the_real_problem(tmp_path, content, needle):
    """Issue 21: never read from the last of two columns, never told to pass --column for a delimiter."""
    path = tmp_path / "p.csv"
    path.write_bytes(content)
    with pytest.raises(UserError, match=needle):
        load_prompts(str(path))


def test_a_special_file_is_not_called_empty_or_missing(tmp_path):
    fifo = tmp_path / "p.jsonl"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero"):
        with pytest.raises(UserError, match="is not a regular file"):
            load_prompts(str(path))
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(UserError, match="is a folder, not a file"):
        load_prompts(str(tmp_path / "d.csv"))


@pytest.mark.parametrize(
    "value, needle", [(None, "is null"), (42, "is int 42, not text"), (["a"], "is list")]
)
def test_a_null_or_non_text_prompt_is_named_by_id_and_record(tmp_path, value, needle):
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"id": "a", "prompt": "hi"}) + "\n" + json.dumps({"id": "b", "prompt": value}) + "\n"
    )
    with pytest.raises(UserError, match=f"id 'b' \\(record 2\\) {needle}"):
        load_prompts(str(path))

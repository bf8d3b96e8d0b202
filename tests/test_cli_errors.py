"""The CLI's error boundary: operating-system and decoding errors on a user's files, and hub ids with
no network, end in one `error:` line and exit 2, never a traceback or a retry storm."""

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from refusal_cliff.cli import main


def _invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def _one_error_line(result, *needles, after_warnings=False):
    """Exit 2 and one `error:` line, naming each of `needles`; `after_warnings` lets `warning:` lines
    that `label` prints before it starts writing come first."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    if after_warnings:
        assert all(line.startswith("warning: ") for line in lines[:-1]), result.stderr
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def generations(tmp_path):
    path = tmp_path / "generations.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "p", "thinking": "t", "answer": "I cannot help"}) + "\n")
    return path


def test_out_under_a_file_is_one_line(generations, tmp_path):
    (tmp_path / "somefile").write_text("x")
    out = tmp_path / "somefile" / "sub"
    line = _one_error_line(
        _invoke("label", "--generations", generations, "--out", out), str(out), after_warnings=True
    )
    assert "not a directory" in line


def test_out_on_a_read_only_folder_is_one_line(generations, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a 0555 folder is still writable")
        _one_error_line(
            _invoke("label", "--generations", generations, "--out", locked / "run"),
            str(locked),
            after_warnings=True,
        )
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize(
    "content",
    [
        b'{"id": "a", "prompt": "caf\xe9", "answer": "no"}\n{"id": "b", "prompt": "x", "answer": "no"}\n',  # latin-1
        bytes(range(256)) * 4 + b"\n" + bytes(range(255, -1, -1)) + b"\n",  # binary
    ],
    ids=["latin1", "binary"],
)
def test_label_on_a_non_utf8_file_is_one_line(content, tmp_path):
    path = tmp_path / "generations.jsonl"
    path.write_bytes(content)
    _one_error_line(_invoke("label", "--generations", path, "--out", tmp_path / "out"), str(path))
    assert path.read_bytes() == content


def test_a_non_utf8_keyword_file_is_one_line(generations, tmp_path):
    keywords = tmp_path / "keywords.txt"
    keywords.write_bytes("désolé\n".encode("latin-1"))
    line = _one_error_line(
        _invoke("label", "--generations", generations, "--keywords", keywords, "--out", tmp_path / "out"),
        str(keywords),
        after_warnings=True,
    )
    assert "UTF-8" in line


def test_debug_shows_the_traceback(generations, tmp_path):
    # (an --out under a file is now refused before any work, as a UserError; a non-UTF-8 keyword file
    # still reaches the boundary as a UnicodeDecodeError)
    keywords = tmp_path / "keywords.txt"
    keywords.write_bytes("désolé\n".encode("latin-1"))
    for args, env in ((["--debug"], None), ([], {"REFUSAL_CLIFF_DEBUG": "1"})):
        result = _invoke(
            *args,
            "label",
            "--generations",
            generations,
            "--keywords",
            keywords,
            "--out",
            tmp_path / "out",
            env=env,
        )
        assert isinstance(result.exception, UnicodeDecodeError), result.output
        assert result.exit_code != 2


# -- hub ids with no network ----------------------------------------------------------------


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"id": "p0", "prompt": "hello"}) + "\n")
    return path


@pytest.mark.parametrize(
    "env",
    [
        {"HF_HUB_OFFLINE": "1"},
        {"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None, "HF_ENDPOINT": "http://127.0.0.1:9"},
    ],
    ids=["HF_HUB_OFFLINE", "unreachable-endpoint"],
)
def test_an_uncached_hub_id_offline_fails_fast_in_one_line(env, prompts, tmp_path, caplog):
    from refusal_cliff.core.models import HUB_TIMEOUT_S

    assert HUB_TIMEOUT_S < 5
    caplog.set_level(logging.WARNING)
    start = time.monotonic()
    result = _invoke(
        "generate", "--model", "some-org/some-model", "--prompts", prompts, "--out", tmp_path / "g", env=env
    )
    elapsed = time.monotonic() - start
    line = _one_error_line(result, "some-org/some-model", "--model", ".gguf")
    assert elapsed < 5, f"took {elapsed:.1f} s"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "local" in line and not (tmp_path / "g" / "generations.jsonl").exists()


@pytest.mark.slow
def test_a_cached_hub_id_loads_with_no_network(tiny_model_dir, prompts, tmp_path):
    """A hub id already in the Hugging Face cache loads from it when the hub does not answer
    (a fresh process, so that huggingface_hub reads HF_HOME)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--some-org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE")
    }
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "refusal_cliff.cli",
            "generate",
            "--model",
            "some-org/tiny",
            "--prompts",
            str(prompts),
            "--max-thinking-tokens",
            "4",
            "--max-answer-tokens",
            "2",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "g"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    records = [json.loads(line) for line in (tmp_path / "g" / "generations.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["p0"]

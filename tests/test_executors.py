"""The Ray Data executor: same artifacts as the local executor, resumable by shard, bad settings refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from refusal_cliff.compute.executors import RayExecutor, check_executor
from refusal_cliff.compute.prober import Prober
from refusal_cliff.compute.tracing import trace_into
from refusal_cliff.core.architectures import get_adapter
from refusal_cliff.core.config import ExecutorConfig
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.models import LoadedModel

from conftest import SRC, make_tiny_model
from conftest import run_cli as _cli

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'refusal-cliff[ray]')")
pytestmark = pytest.mark.ray
END = "\n</think>\n\n"


def make_records(n: int) -> list[dict]:
    return [
        {
            "id": f"r{i:03d}",
            "prompt": f"Question {i}?",
            "system_prompt": None,
            "generation_prompt": f"<|im_start|>user\nQuestion {i}?<|im_end|>\n<|im_start|>assistant\n<think>\n",
            "thinking": "Some careful thinking. " * (i % 5),
            "end_template": END,
            "answer": "ok",
        }
        for i in range(n)
    ]


def random_prober(layer: int = 1, d_model: int = 64) -> Prober:
    torch.manual_seed(0)
    linear = torch.nn.Linear(d_model, 1)
    with torch.no_grad():
        linear.weight.mul_(4.0)
    return Prober(linear.requires_grad_(False), layer=layer, metadata={})


def _artifacts(folder: Path) -> tuple[list[dict], object]:
    rows = [json.loads(line) for line in (folder / "cliff.jsonl").read_text().splitlines()]
    return rows, pq.read_table(folder / "traces.parquet")


# the workers run other batches (shards) on one torch thread each: the embedded model's 30 float32 layers then round
# differently, by about 1e-6 in a score (once 1.55e-6, 3 of 1262 tokens over 1e-6 in a CI run), so: 1e-5
SCORE_ATOL = 1e-5


def assert_same_trace(local: Path, other: Path) -> None:
    """Same ids in the same order in cliff.jsonl and traces.parquet, scores within SCORE_ATOL."""
    local_rows, local_table = _artifacts(local)
    rows, table = _artifacts(other)
    assert [r["id"] for r in rows] == [r["id"] for r in local_rows]
    for column in ("id", "position", "token_id", "token", "region"):
        assert table.column(column).to_pylist() == local_table.column(column).to_pylist()
    np.testing.assert_allclose(
        table.column("score").to_numpy(), local_table.column("score").to_numpy(), atol=SCORE_ATOL, rtol=0
    )
    for a, b in zip(rows, local_rows):
        assert a.keys() == b.keys() and a["group"] == b["group"] and a["t_cliff"] == b["t_cliff"]
        for key in ("plateau", "final", "ms", "drop"):
            assert (a[key] is None and b[key] is None) or abs(a[key] - b[key]) <= SCORE_ATOL
    assert (
        json.loads((other / "curves.json").read_text()).keys()
        == json.loads((local / "curves.json").read_text()).keys()
    )
    assert not (other / "shards").exists()


def test_ray_trace_equals_local_trace(ray_cluster, smol_tokenizer, tmp_path):
    model = make_tiny_model("LlamaForCausalLM")
    loaded = LoadedModel(model, smol_tokenizer, get_adapter(model), "tiny", None, "local")
    records, prober = make_records(12), random_prober()
    groups = {r["id"]: ("harmless" if i % 2 else "harmful_complied") for i, r in enumerate(records)}
    assert trace_into(loaded, prober, records, tmp_path / "local", groups, batch_size=2, progress=False) == 12
    executor = RayExecutor(ExecutorConfig(executor="ray", workers=2, shard_size=3))
    assert (
        trace_into(
            loaded, prober, records, tmp_path / "ray", groups, batch_size=2, progress=False, executor=executor
        )
        == 12
    )
    assert_same_trace(tmp_path / "local", tmp_path / "ray")


# -- the CLI: trace and select with --executor ray vs local, a killed driver, bad settings ------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """generations.jsonl (+ labels.jsonl beside it) of 40 records and a random prober for the tiny model."""
    from refusal_cliff.compute.prober import save_prober

    root = tmp_path_factory.mktemp("ray-inputs")
    records = make_records(40)
    (root / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "labels.jsonl").write_text(
        "".join(json.dumps({"id": r["id"], "refusal": i % 3 == 0}) + "\n" for i, r in enumerate(records))
    )
    save_prober(random_prober(), root / "probe")
    return root


def _trace_args(model, inputs: Path, out: Path, *extra) -> list:
    return [
        "trace",
        "--model",
        model,
        "--prober",
        inputs / "probe",
        "--generations",
        inputs / "generations.jsonl",
        "--batch-size",
        2,
        "--out",
        out,
        *extra,
    ]


@pytest.mark.parametrize("model", ["tiny", pytest.param("default", marks=pytest.mark.slow)])
def test_cli_trace_ray_equals_local(model, tiny_model_dir, inputs, tmp_path):
    from refusal_cliff.compute.prober import save_prober

    name = tiny_model_dir if model == "tiny" else "default"
    if model == "default":  # a prober for the embedded model's width and depth
        save_prober(random_prober(layer=29, d_model=576), inputs / "probe-default")
    prober = ["--prober", inputs / ("probe" if model == "tiny" else "probe-default")]
    args = lambda out, *extra: [
        *_trace_args(name, inputs, out, *extra)[:3],
        *prober,
        *_trace_args(name, inputs, out, *extra)[5:],
    ]
    local = _cli(*args(tmp_path / "local"))
    assert local.returncode == 0, local.stderr[-2000:]
    distributed = _cli(*args(tmp_path / "ray", "--executor", "ray", "--workers", 2, "--shard-size", 8))
    assert distributed.returncode == 0, distributed.stderr[-2000:]
    assert_same_trace(tmp_path / "local", tmp_path / "ray")
    metadata = json.loads((tmp_path / "ray" / "metadata.json").read_text())
    assert metadata["executor"]["name"] == "ray" and metadata["executor"]["workers"] == 2


def test_cli_select_ray_equals_local(tiny_model_dir, inputs, tmp_path):
    common = [
        "select",
        "--model",
        tiny_model_dir,
        "--prober",
        inputs / "probe",
        "--candidates",
        "demo:candidates",
        "--limit",
        12,
        "--k",
        4,
        "--max-thinking-tokens",
        8,
        "--max-answer-tokens",
        4,
        "--batch-size",
        4,
        "--chunk-size",
        6,
    ]
    local = _cli(*common, "--out", tmp_path / "local")
    assert local.returncode == 0, local.stderr[-2000:]
    distributed = _cli(*common, "--out", tmp_path / "ray", "--executor", "ray", "--workers", 2)
    assert distributed.returncode == 0, distributed.stderr[-2000:]
    rows = {
        name: [json.loads(line) for line in (tmp_path / name / "scores.jsonl").read_text().splitlines()]
        for name in ("local", "ray")
    }
    assert [r["id"] for r in rows["ray"]] == [r["id"] for r in rows["local"]]
    for a, b in zip(rows["ray"], rows["local"]):
        assert a.keys() == b.keys() and a["refusal"] == b["refusal"] and a["t_cliff"] == b["t_cliff"]
        for key in ("plateau", "final", "ms", "drop"):
            assert (a[key] is None and b[key] is None) or abs(a[key] - b[key]) <= 1e-6
    for name in ("generations.jsonl", "selection.jsonl"):
        assert (tmp_path / "ray" / name).read_text() == (tmp_path / "local" / name).read_text()
    assert not (tmp_path / "ray" / "shards").exists()


def test_killed_ray_driver_resumes_without_lost_or_duplicated_ids(tiny_model_dir, inputs, tmp_path):
    args = _trace_args(
        tiny_model_dir, inputs, tmp_path / "killed", "--executor", "ray", "--workers", 2, "--shard-size", 1
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "refusal_cliff.cli", *map(str, args)],
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    shards = tmp_path / "killed" / "shards" / "trace"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(shards.glob("shard-*.parquet"))) < 4:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # the driver only: its workers are left to die with it
    process.wait()
    time.sleep(1)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # and whatever of the local cluster it started outlived it
    except ProcessLookupError:
        pass
    written = len(list(shards.glob("shard-*.parquet")))
    assert 4 <= written < 40, "the driver must be killed part-way for this test to mean anything"
    assert (
        not (tmp_path / "killed" / "cliff.jsonl").exists()
        or len((tmp_path / "killed" / "cliff.jsonl").read_text().splitlines()) < 40
    )
    resumed = _cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = _cli(
        *_trace_args(
            tiny_model_dir, inputs, tmp_path / "whole", "--executor", "ray", "--workers", 2, "--shard-size", 1
        )
    )
    assert whole.returncode == 0, whole.stderr[-2000:]
    rows, table = _artifacts(tmp_path / "killed")
    ids = [r["id"] for r in rows]
    assert ids == [f"r{i:03d}" for i in range(40)]  # none lost, none duplicated, in record order
    assert list(dict.fromkeys(table.column("id").to_pylist())) == ids
    assert (tmp_path / "killed" / "cliff.jsonl").read_text() == (
        tmp_path / "whole" / "cliff.jsonl"
    ).read_text()
    assert_same_trace(tmp_path / "whole", tmp_path / "killed")


@pytest.mark.parametrize("case", ["workers_0", "gpus_without_gpu", "unreachable_address", "bad_address"])
def test_bad_executor_settings_are_one_line_exit_2(case, tiny_model_dir, inputs, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "cliff.jsonl").write_text("kept\n")
    extra = {
        "workers_0": ["--executor", "ray", "--workers", 0],
        "gpus_without_gpu": ["--executor", "ray", "--gpus-per-worker", 1],
        "unreachable_address": ["--executor", "ray", "--ray-address", "127.0.0.1:9"],
        "bad_address": ["--executor", "ray", "--ray-address", "nowhere"],
    }[case]
    if case == "gpus_without_gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    started = time.time()
    result = _cli(*_trace_args(tiny_model_dir, inputs, out, *extra), timeout=60)
    assert time.time() - started < 30
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-2000:]
    assert (out / "cliff.jsonl").read_text() == "kept\n" and not (out / "metadata.json").exists()


def test_executor_checks_in_the_library():
    with pytest.raises(UserError, match="--workers"):
        check_executor(ExecutorConfig(executor="ray", workers=0))
    with pytest.raises(UserError, match="--executor ray"):
        check_executor(ExecutorConfig(ray_address="127.0.0.1:1"))


def test_executor_ray_without_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as without the extra
    with pytest.raises(UserError, match=r"pip install 'refusal-cliff\[ray\]'"):
        check_executor(ExecutorConfig(executor="ray"))

"""The Ray Data executor for `heads`, `probe train`'s capture, `layers` and `evaluate`'s final scores:
the same artifacts as the local executor, resumable by shard, bad settings refused before loading;
what workers are told to load, and which shards a re-run may reuse."""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from refusal_cliff.compute.executors import RayExecutor
from refusal_cliff.compute.prober import Prober, save_prober
from refusal_cliff.compute.tracing import trace_into, trace_job
from refusal_cliff.core.architectures import get_adapter
from refusal_cliff.core.config import ExecutorConfig, GenerationConfig, ModelConfig
from refusal_cliff.core.models import LoadedModel
from refusal_cliff.stages.evaluate import EvalConfig, ModelSpec, run_evaluate
from refusal_cliff.stages.heads import HeadsConfig, run_heads
from refusal_cliff.stages.layers import LayersConfig, run_layers
from refusal_cliff.stages.probe import ProbeConfig, run_probe_train

from conftest import make_tiny_model, run_cli

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'refusal-cliff[ray]')")
pytestmark = pytest.mark.ray
END = "\n</think>\n\n"
ATOL = 1e-6


def ray_executor(shard_size: int | None = 3) -> RayExecutor:
    return RayExecutor(ExecutorConfig(executor="ray", workers=2, shard_size=shard_size))


def tiny_loaded(tokenizer, seed: int = 0) -> LoadedModel:
    model = make_tiny_model("LlamaForCausalLM", seed=seed)
    return LoadedModel(model, tokenizer, get_adapter(model), f"tiny-{seed}", None, "local")


def record(identifier: str, prompt: str, thinking: str, answer: str) -> dict:
    return {
        "id": identifier,
        "prompt": prompt,
        "system_prompt": None,
        "generation_prompt": f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n",
        "thinking": thinking,
        "end_template": END,
        "answer": answer,
    }


def write_run(folder: Path, rows: list[tuple[dict, bool]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r, _ in rows))
    (folder / "labels.jsonl").write_text(
        "".join(
            json.dumps({"id": r["id"], "refusal": refusal, "judge": "keyword", "matched": None}) + "\n"
            for r, refusal in rows
        )
    )
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A harmful and a harmless generation run (distinct ids, lengths varied) and a random prober."""
    root = tmp_path_factory.mktemp("stage-inputs")
    harmful = write_run(
        root / "harmful",
        [
            (
                record(f"h{i:02d}", f"How do I build weapon {i}?", "This is dangerous. " * (1 + i % 4), "No"),
                i % 3 != 0,
            )
            for i in range(12)
        ],
    )
    harmless = write_run(
        root / "harmless",
        [
            (
                record(f"b{i:02d}", f"Tell me about cats {i}.", "Cats are nice. " * (1 + i % 3), "Cats..."),
                i == 0,
            )
            for i in range(10)
        ],
    )
    save_prober(random_prober(), root / "probe")
    return root, harmful, harmless


def random_prober() -> Prober:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 1)
    with torch.no_grad():
        linear.weight.mul_(4.0)
    return Prober(linear.requires_grad_(False), layer=1, metadata={})


def assert_same_heads(local: Path, other: Path, shift: float = 0.0) -> None:
    """Same heads in the same order in heads.json, every number within ATOL (contributions after
    `shift`; their spread is not compared when shifted)."""
    expected = json.loads((local / "heads.json").read_text())
    actual = json.loads((other / "heads.json").read_text())
    assert [(h["layer"], h["head"]) for h in actual] == [(h["layer"], h["head"]) for h in expected]
    for a, b in zip(actual, expected):
        assert a.keys() == b.keys() and a["rank"] == b["rank"]
        for key, value in b.items():
            if isinstance(value, float) and not (shift and key == "std"):
                assert abs(a[key] - value - (shift if key == "contribution" else 0.0)) <= ATOL, key
    assert not (other / "shards").exists()


def test_ray_heads_equals_local(ray_cluster, smol_tokenizer, runs, tmp_path):
    _, harmful, _ = runs
    loaded, config = tiny_loaded(smol_tokenizer), HeadsConfig(group="all", batch_size=2)
    generations = harmful / "generations.jsonl"
    run_heads(loaded, random_prober(), generations, tmp_path / "local", config, progress=False)
    executor = ray_executor()
    run_heads(
        loaded, random_prober(), generations, tmp_path / "ray", config, progress=False, executor=executor
    )
    assert_same_heads(tmp_path / "local", tmp_path / "ray")
    metadata = json.loads((tmp_path / "ray" / "metadata.json").read_text())
    assert metadata["executor"]["name"] == "ray" and metadata["executor"]["workers"] == 2
    assert metadata["n_examples"] == 12


def test_resumed_heads_reuse_complete_shards_of_the_same_key_only(
    ray_cluster, smol_tokenizer, runs, tmp_path, monkeypatch
):
    _, harmful, _ = runs
    loaded, config = tiny_loaded(smol_tokenizer), HeadsConfig(group="all", batch_size=2)
    generations = harmful / "generations.jsonl"
    run_heads(loaded, random_prober(), generations, tmp_path / "local", config, progress=False)
    out, shards = tmp_path / "ray", tmp_path / "ray" / "shards" / "heads"
    with monkeypatch.context() as patch:  # keep the shards, as a killed run leaves them
        patch.setattr(RayExecutor, "remove_shards", staticmethod(lambda out_dir, name: None))
        run_heads(loaded, random_prober(), generations, out, config, progress=False, executor=ray_executor())
    assert sorted(p.name for p in shards.glob("shard-*")) == [f"shard-{i:05d}.safetensors" for i in range(4)]
    first = shards / "shard-00000.safetensors"

    def tamper() -> None:  # a marker: +100 on each head of shard 0's 3 examples
        tensors = load_file(first)
        tensors["contribution"] += 100.0
        with safe_open(first, "pt") as handle:
            metadata = handle.metadata()
        save_file(tensors, first, metadata=metadata)

    tamper()
    (shards / "shard-00003.safetensors").unlink()  # an incomplete run: the last shard is missing
    run_heads(loaded, random_prober(), generations, out, config, progress=False, executor=ray_executor())
    assert_same_heads(tmp_path / "local", out, shift=100.0 * 3 / 12)  # shard 0 reused, not recomputed
    # shards written for other inputs (another key in the manifest) are never reused
    with monkeypatch.context() as patch:
        patch.setattr(RayExecutor, "remove_shards", staticmethod(lambda out_dir, name: None))
        run_heads(loaded, random_prober(), generations, out, config, progress=False, executor=ray_executor())
    tamper()
    manifest = json.loads((shards / "manifest.json").read_text())
    (shards / "manifest.json").write_text(json.dumps({**manifest, "key": "another-prober"}))
    run_heads(loaded, random_prober(), generations, out, config, progress=False, executor=ray_executor())
    assert_same_heads(tmp_path / "local", out)


def test_ray_probe_train_equals_local(ray_cluster, smol_tokenizer, runs, tmp_path):
    _, harmful, harmless = runs
    loaded, config = tiny_loaded(smol_tokenizer), ProbeConfig(batch_size=2)
    local = run_probe_train(loaded, harmful, harmless, tmp_path / "local", config, ood_runs=[harmful])
    executor = ray_executor()
    other = run_probe_train(
        loaded, harmful, harmless, tmp_path / "ray", config, ood_runs=[harmful], executor=executor
    )
    for name, value in load_file(local.path).items():
        torch.testing.assert_close(load_file(other.path)[name], value, atol=ATOL, rtol=0)
    expected, actual = local.prober.metadata["metrics"], other.prober.metadata["metrics"]
    assert actual.keys() == expected.keys() and actual["ood_accuracy"] is not None
    for key, value in expected.items():
        np.testing.assert_allclose(np.asarray(actual[key], float), np.asarray(value, float), atol=ATOL)
    metadata = json.loads((tmp_path / "ray" / "metadata.json").read_text())
    assert metadata["executor"]["name"] == "ray" and not (tmp_path / "ray" / "shards").exists()


def test_ray_layers_equals_local(ray_cluster, smol_tokenizer, runs, tmp_path):
    _, harmful, harmless = runs
    loaded, config = tiny_loaded(smol_tokenizer), LayersConfig(layers=(0,), epochs=2, batch_size=2)
    run_layers(loaded, harmful, harmless, tmp_path / "local", config)
    run_layers(loaded, harmful, harmless, tmp_path / "ray", config, executor=ray_executor(shard_size=None))
    expected = json.loads((tmp_path / "local" / "layerwise.json").read_text())
    actual = json.loads((tmp_path / "ray" / "layerwise.json").read_text())
    assert list(actual) == list(expected) == ["0", "1"]
    for layer, entry in expected.items():
        assert list(actual[layer]) == list(entry)
        for group, value in entry.items():
            if group == "ms_mean":
                np.testing.assert_allclose(actual[layer][group], value, atol=ATOL)
            else:
                np.testing.assert_allclose(actual[layer][group]["mean"], value["mean"], atol=ATOL)
                np.testing.assert_allclose(actual[layer][group]["ms_mean"], value["ms_mean"], atol=ATOL)
        local_weights = load_file(tmp_path / "local" / f"layer_{int(layer):02d}" / "prober.safetensors")
        ray_weights = load_file(tmp_path / "ray" / f"layer_{int(layer):02d}" / "prober.safetensors")
        for name, value in local_weights.items():
            torch.testing.assert_close(ray_weights[name], value, atol=ATOL, rtol=0)
    assert not (tmp_path / "ray" / "shards").exists()


def test_ray_evaluate_final_scores_equal_local(ray_cluster, smol_tokenizer, runs, tmp_path):
    root, _, _ = runs
    models = {"a": tiny_loaded(smol_tokenizer, 0), "b": tiny_loaded(smol_tokenizer, 1)}
    # two prompt sets sharing ids: the shards key examples by position
    harmful = {
        s: [{"id": str(i), "prompt": f"{s} harmful request {i}"} for i in range(3)] for s in ("x", "y")
    }
    config = EvalConfig(generation=GenerationConfig(max_thinking_tokens=4, max_answer_tokens=3, batch_size=2))
    specs = [ModelSpec("before", "a"), ModelSpec("after", "b")]
    results = {}
    for name, executor in (("local", None), ("ray", ray_executor(shard_size=2))):
        evaluation = run_evaluate(
            specs, harmful, {}, tmp_path / name, config, root / "probe", load=models.get, executor=executor
        )
        results[name] = evaluation["models"]
    for a, b in zip(results["ray"], results["local"]):
        assert a["model"] == b["model"] and a["asr"] == b["asr"] and 0 < b["final_score_mean"] < 1
        assert abs(a["final_score_mean"] - b["final_score_mean"]) <= ATOL
        assert abs(a["ms_mean"] - b["ms_mean"]) <= ATOL
    assert json.loads((tmp_path / "ray" / "metadata.json").read_text())["executor"]["name"] == "ray"
    assert not any((tmp_path / "ray" / "models").glob("*/shards"))


# -- the CLI ---------------------------------------------------------------------------------------


def test_cli_heads_ray_equals_local(tiny_model_dir, runs, tmp_path):
    root, harmful, _ = runs
    args = lambda out: [
        "heads",
        "--model",
        tiny_model_dir,
        "--prober",
        root / "probe",
        "--generations",
        harmful / "generations.jsonl",
        "--batch-size",
        2,
        "--out",
        out,
    ]
    local = run_cli(*args(tmp_path / "local"))
    assert local.returncode == 0, local.stderr[-2000:]
    distributed = run_cli(*args(tmp_path / "ray"), "--executor", "ray", "--workers", 2)
    assert distributed.returncode == 0, distributed.stderr[-2000:]
    assert_same_heads(tmp_path / "local", tmp_path / "ray")
    assert json.loads((tmp_path / "ray" / "metadata.json").read_text())["executor"]["workers"] == 2


@pytest.mark.parametrize("verb", ["heads", "probe train", "layers", "evaluate"])
def test_bad_executor_settings_fail_before_loading(verb, runs, tmp_path):
    root, harmful, harmless = runs
    args = {
        "heads": ["--prober", root / "probe", "--generations", harmful / "generations.jsonl"],
        "probe train": ["--harmful", harmful, "--harmless", harmless],
        "layers": ["--harmful", harmful, "--harmless", harmless],
        "evaluate": ["--harmful", "demo:harmful", "--limit", 1],
    }[verb]
    model = ["--model", "no/such-model"]  # never loaded: the settings are refused first
    started = time.time()
    result = run_cli(
        *verb.split(),
        *model,
        *args,
        "--executor",
        "ray",
        "--ray-address",
        "127.0.0.1:1",  # nothing listens there: check_executor refuses it, no cluster is joined
        "--out",
        tmp_path / "o",
        timeout=60,
    )
    assert time.time() - started < 30
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach the Ray cluster at 127.0.0.1:1" in lines[0], result.stderr[
        -2000:
    ]
    assert not (tmp_path / "o").exists()


# -- what workers load, which shards are reused (no Ray cluster: fast) ---------------------------------


def test_workers_load_the_drivers_dtype_from_absolute_paths(smol_tokenizer, tmp_path, monkeypatch):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # the driver's relative paths mean nothing in a worker's directory
    loaded = tiny_loaded(smol_tokenizer)
    loaded.model.to(torch.bfloat16)  # as "auto" loads it on a GPU driver; a CPU worker's "auto" is fp32
    executor = RayExecutor(ExecutorConfig(executor="ray"), ModelConfig(model="models/tiny"))
    job = trace_job(random_prober(), 2)
    kwargs = executor._worker_kwargs(loaded, job, Path("run/shards/trace"))
    assert kwargs["model"] == ModelConfig(model=str(tmp_path.resolve() / "models" / "tiny"), dtype="bfloat16")
    assert kwargs["shard_dir"] == str(tmp_path.resolve() / "run" / "shards" / "trace")
    assert kwargs["loaded"] is None and executor.model.dtype == "auto"  # the CLI's config is left as it is
    # evaluate's models: each one's own dtype, on the same cluster object (one start, one shutdown)
    other = executor.for_model("org/hub-model")
    assert other._cluster is executor._cluster
    loaded.model.to(torch.float16)
    shipped = other._worker_kwargs(loaded, job, tmp_path / "shards")["model"]
    assert shipped.model == "org/hub-model" and shipped.dtype == "float16"  # a hub id stays a hub id


def _in_process_compute(computed: list):
    """`RayExecutor._compute` without Ray: each missing shard computed here, as a worker would."""

    def compute(self, loaded, job, shards, shard_dir, progress):
        for index, records in shards:
            computed.append(index)
            job.write(shard_dir / f"shard-{index:05d}{job.suffix}", list(job.compute(loaded, records)))

    return compute


def test_trace_shards_of_another_dtype_or_key_are_discarded(smol_tokenizer, tmp_path, monkeypatch):
    computed: list[int] = []
    monkeypatch.setattr(RayExecutor, "_compute", _in_process_compute(computed))
    monkeypatch.setattr(RayExecutor, "remove_shards", staticmethod(lambda out_dir, name: None))
    records = [record(f"r{i}", f"Question {i}?", "Some thinking. " * (1 + i % 3), "ok") for i in range(6)]
    loaded, executor = tiny_loaded(smol_tokenizer), ray_executor(shard_size=2)
    trace = lambda loaded, out: trace_into(  # noqa: E731
        loaded, random_prober(), records, out, batch_size=2, progress=False, executor=executor
    )
    trace(loaded, tmp_path / "first")
    assert computed == [0, 1, 2]
    shards = tmp_path / "first" / "shards" / "trace"

    def rerun(name: str, loaded, key: str | None = None) -> list[int]:
        """The first run's shards in a fresh run folder: the shards computed again."""
        shutil.copytree(shards, tmp_path / name / "shards" / "trace")
        if key is not None:
            manifest = tmp_path / name / "shards" / "trace" / "manifest.json"
            manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "key": key}))
        computed.clear()
        trace(loaded, tmp_path / name)
        return list(computed)

    assert rerun("same", loaded) == []  # same inputs, prober, model and dtype: reused
    bf16 = LoadedModel(
        copy.deepcopy(loaded.model).to(torch.bfloat16),
        smol_tokenizer,
        loaded.adapter,
        "tiny-0",
        None,
        "local",
    )
    assert rerun("bf16", bf16) == [0, 1, 2]  # the fp32 shards are not the bf16 model's
    assert rerun("other-key", loaded, key="another-run") == [0, 1, 2]
    manifest = json.loads((tmp_path / "other-key" / "shards" / "trace" / "manifest.json").read_text())
    assert manifest["key"] == json.loads((shards / "manifest.json").read_text())["key"]

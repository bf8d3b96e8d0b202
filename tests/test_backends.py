"""Generation backends: per-example seeds (HF), the vLLM backend's request mapping, the --backend flag."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from refusal_cliff.compute.generation import HFBackend, example_seed, generate_records
from refusal_cliff.core.architectures import get_adapter
from refusal_cliff.core.config import GenerationConfig
from refusal_cliff.core.models import LoadedModel
from refusal_cliff.stages.generate import run_generate

from conftest import make_tiny_model

SRC = str(Path(__file__).resolve().parents[1] / "src")
PROMPTS = [
    {"id": f"p{i:02d}", "prompt": f"Tell me about item {i}." + " Please explain." * (i % 3)}
    for i in range(10)
]


@pytest.fixture
def tiny_loaded(smol_tokenizer):
    model = make_tiny_model("LlamaForCausalLM")
    return LoadedModel(model, smol_tokenizer, get_adapter(model), "tiny", None, "local")


def _sampled(batch_size: int, seed: int = 3) -> GenerationConfig:
    return GenerationConfig(
        max_thinking_tokens=12,
        max_answer_tokens=6,
        batch_size=batch_size,
        temperature=0.7,
        top_p=0.95,
        seed=seed,
    )


# -- per-example seeds (HF) -----------------------------------------------------------------------


def test_example_seed_depends_on_the_id_and_the_seed_only():
    assert example_seed(0, "a") == example_seed(0, "a")
    assert example_seed(0, "a") != example_seed(0, "b")
    assert example_seed(1, "a") == example_seed(0, "a") + 1
    assert 0 <= example_seed(2**62, "z") < 2**63


@pytest.mark.slow
def test_a_sampled_example_does_not_depend_on_its_batch(tiny_loaded):
    batched = {r["id"]: r for r in generate_records(tiny_loaded, PROMPTS[:6], _sampled(4), progress=False)}
    for prompt in PROMPTS[:6]:
        alone = next(generate_records(tiny_loaded, [prompt], _sampled(1), progress=False))
        assert (alone["thinking"], alone["answer"]) == (
            batched[prompt["id"]]["thinking"],
            batched[prompt["id"]]["answer"],
        )
    other_seed = {
        r["id"]: r for r in generate_records(tiny_loaded, PROMPTS[:6], _sampled(4, seed=4), progress=False)
    }
    greedy_config = GenerationConfig(max_thinking_tokens=12, max_answer_tokens=6, batch_size=4)
    greedy = {r["id"]: r for r in generate_records(tiny_loaded, PROMPTS[:6], greedy_config, progress=False)}
    # the test means something: sampling is not greedy, and another seed samples other text
    assert any(other_seed[k]["thinking"] != batched[k]["thinking"] for k in batched)
    assert any(greedy[k]["thinking"] != batched[k]["thinking"] for k in batched)


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 4])
def test_resumed_sampled_generate_equals_uninterrupted_byte_for_byte(
    tiny_loaded, tmp_path, monkeypatch, batch_size
):
    config = _sampled(batch_size)
    whole = run_generate(tiny_loaded, PROMPTS, config, tmp_path / "whole", progress=False)

    calls = {"n": 0}
    original = HFBackend.complete
    fail_at = 2 * math.ceil(6 / batch_size) + 1  # 2 calls a batch (thinking, answer): >= 6 records

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HFBackend, "complete", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_generate(tiny_loaded, PROMPTS, config, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(HFBackend, "complete", original)
    target = tmp_path / "resumed" / "generations.jsonl"
    lines = target.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) >= 6
    # a kill while a batch was being written: 5 records kept, so the resumed batches are not the first run's
    target.write_text("".join(lines[:5]), encoding="utf-8")
    run_generate(tiny_loaded, PROMPTS, config, tmp_path / "resumed", progress=False)
    assert target.read_bytes() == whole.read_bytes()
    assert [json.loads(line)["id"] for line in whole.read_text().splitlines()] == [p["id"] for p in PROMPTS]


# -- the vLLM backend's request mapping (a fake engine; vLLM itself is only on GPU hosts) -----------------


class FakeVLLM:
    """vLLM's `LLM.generate(prompts, sampling_params)`: returns planted outputs, records the requests."""

    def __init__(self, planted):
        self.planted = planted  # one (text, token_ids, finish_reason, stop_reason) per request
        self.requests = []

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        self.requests.append((prompts, sampling_params))
        return [
            SimpleNamespace(
                outputs=[SimpleNamespace(text=text, token_ids=ids, finish_reason=finish, stop_reason=stop)]
            )
            for text, ids, finish, stop in self.planted[: len(prompts)]
        ]


@pytest.fixture
def meta_loaded(smol_tokenizer):
    """A LoadedModel whose weights are on the meta device, as `generate --backend vllm` loads it."""
    import torch

    with torch.device("meta"):
        model = make_tiny_model("LlamaForCausalLM")
    return LoadedModel(model, smol_tokenizer, get_adapter(model), "tiny", None, "local")


def test_vllm_requests_carry_budget_stop_string_and_per_example_seeds(meta_loaded):
    from refusal_cliff.compute.backends import VLLMBackend

    eos = meta_loaded.tokenizer.eos_token_id
    engine = FakeVLLM(
        [
            ("a thought\n</think>", [5, 6, 7], "stop", "</think>"),
            ("short", [8, eos], "stop", None),
            ("x" * 9, [9] * 4, "length", None),
        ]
    )
    backend = VLLMBackend(meta_loaded, engine=engine)
    texts = ["<|im_start|>user\nhi<|im_end|>\n<think>\n", "b", "c"]
    seeds = [example_seed(0, i) for i in ("p0", "p1", "p2")]
    completions = backend.complete(texts, 4, ["</think>"], 0.7, 0.9, seeds)
    prompts, params = engine.requests[0]
    # the HF tokenisation of each text, without added special tokens: the same sequence HFBackend continues
    expected = meta_loaded.tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    assert prompts[0]["prompt_token_ids"] == expected
    assert [p.max_tokens for p in params] == [4, 4, 4]
    assert all(p.stop == ["</think>"] and p.include_stop_str_in_output for p in params)
    assert [p.seed for p in params] == seeds
    assert all(p.temperature == 0.7 and p.top_p == 0.9 and eos in p.stop_token_ids for p in params)
    assert [c.finish for c in completions] == ["stop", "eos", "length"]
    assert completions[0].text == "a thought\n</think>"
    assert [c.n_tokens for c in completions] == [3, 1, 4]  # the EOS id is not counted, as in HFBackend
    greedy = backend.sampling_params(2, 8, (), 0.0, 0.5, [1, 2])
    assert all(p.temperature == 0.0 and p.seed is None and p.stop == [] for p in greedy)


@pytest.mark.parametrize("stop_reason", ["none", "eos id"])
def test_vllm_text_that_ran_to_eos_does_not_end_in_the_eos_text(meta_loaded, stop_reason):
    """A real vLLM engine with skip_special_tokens=False returns "...prime number.<|im_end|>" when the model
    stops on EOS (stop_reason None for the tokenizer's EOS, the id for one given in stop_token_ids); the
    thinking and the answer must end where HFBackend's end, before the EOS token's text."""
    from refusal_cliff.compute.backends import VLLMBackend

    tokenizer = meta_loaded.tokenizer
    eos = tokenizer.eos_token_id
    body = " two is the only even prime number."
    ids = tokenizer(body, add_special_tokens=False)["input_ids"] + [eos]
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert text.endswith("<|im_end|>")  # what the engine returns
    planted = [(text, ids, "stop", None if stop_reason == "none" else eos)]
    (completion,) = VLLMBackend(meta_loaded, engine=FakeVLLM(planted)).complete(["q"], 16)
    assert (completion.text, completion.finish, completion.n_tokens) == (body, "eos", len(ids) - 1)


def test_vllm_finish_reasons_become_thinking_end(meta_loaded):
    from refusal_cliff.compute.backends import VLLMBackend

    eos = meta_loaded.tokenizer.eos_token_id
    planted = [
        ("I think\n</think>", [1, 2], "stop", "</think>"),
        ("I stop", [3, eos], "stop", None),
        ("and on and on", [4, 5, 6, 7], "length", None),
    ]

    class Engine(FakeVLLM):  # thinking requests get the planted thoughts, answers a fixed reply
        def generate(self, prompts, sampling_params=None, use_tqdm=True):
            if sampling_params[0].stop:
                return super().generate(prompts, sampling_params, use_tqdm)
            self.requests.append((prompts, sampling_params))
            answer = SimpleNamespace(
                text=" Sure.", token_ids=[9, eos], finish_reason="stop", stop_reason=None
            )
            return [SimpleNamespace(outputs=[answer]) for _ in prompts]

    engine = Engine(planted)
    config = GenerationConfig(max_thinking_tokens=4, max_answer_tokens=3, batch_size=8, temperature=0.7)
    records = {
        r["id"]: r
        for r in generate_records(
            meta_loaded, PROMPTS[:3], config, backend=VLLMBackend(meta_loaded, engine=engine), progress=False
        )
    }
    tokenize = lambda text: tuple(meta_loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
    by_tokens = {tokenize(r["generation_prompt"]): key for key, r in records.items()}
    order = [by_tokens[tuple(prompt["prompt_token_ids"])] for prompt in engine.requests[0][0]]  # as requested
    ends = [records[i]["thinking_end"] for i in order]
    assert ends == ["marker", "eos", "budget"]
    assert [records[i]["thinking_clipped"] for i in order] == [False, False, True]
    assert records[order[0]]["thinking"] == "I think"
    assert [p.seed for p in engine.requests[0][1]] == [example_seed(0, i) for i in order]
    assert [p.seed for p in engine.requests[1][1]] == [example_seed(1, i) for i in order]  # answers: seed + 1
    assert all(records[i]["answer"] == "Sure." and records[i]["answer_tokens"] == 1 for i in order)


def test_vllm_backend_records_itself_in_metadata(meta_loaded, tmp_path, monkeypatch):
    from refusal_cliff.compute import backends
    from refusal_cliff.core.config import BackendConfig
    from refusal_cliff.stages import generate

    engine = FakeVLLM([("t\n</think>", [1, 2], "stop", "</think>")] * 4)
    monkeypatch.setattr(backends.VLLMBackend, "engine", property(lambda self: engine))
    fake_info = lambda config: {"name": config.backend, "version": "0.0-fake"}
    monkeypatch.setattr(generate, "backend_info", fake_info)  # run_generate's metadata
    config = GenerationConfig(max_thinking_tokens=4, max_answer_tokens=3)
    run_generate(meta_loaded, PROMPTS[:2], config, tmp_path, backend=BackendConfig(backend="vllm"))
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    assert metadata["backend"] == {"name": "vllm", "version": "0.0-fake"}
    assert metadata["config"]["backend"] == "vllm"


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(_vllm_installed(), reason="vLLM is installed: the missing-extra message cannot be shown")
def test_backend_vllm_without_vllm_is_one_line_exit_2(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\nhello\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / "generations.jsonl").write_text("kept\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "refusal_cliff.cli",
            "generate",
            "--model",
            str(tiny_model_dir),
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--backend",
            "vllm",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "make setup-vllm" in result.stderr
    assert (out / "generations.jsonl").read_text() == "kept\n" and not (out / "metadata.json").exists()


def test_vllm_settings_without_backend_vllm_are_refused():
    from refusal_cliff.core.config import BackendConfig
    from refusal_cliff.core.errors import UserError

    with pytest.raises(UserError, match="--backend vllm"):
        BackendConfig(tensor_parallel_size=2).validate()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not _vllm_installed(), reason="vLLM is not installed (pip install 'refusal-cliff[vllm]')")
def test_vllm_generate_on_a_gpu_matches_the_record_format(tmp_path):
    from refusal_cliff.compute.backends import load_tokenizer_side
    from refusal_cliff.core.config import BackendConfig, ModelConfig

    loaded = load_tokenizer_side(ModelConfig(model="default", dtype="bfloat16"))
    config = GenerationConfig(max_thinking_tokens=32, max_answer_tokens=16, batch_size=4)
    target = run_generate(
        loaded,
        PROMPTS[:4],
        config,
        tmp_path,
        progress=False,
        backend=BackendConfig(backend="vllm", gpu_memory_utilization=0.3),
    )
    records = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["id"] for r in records] == [p["id"] for p in PROMPTS[:4]]
    assert all(r["thinking_tokens"] <= 32 and r["answer_tokens"] <= 16 for r in records)
    assert json.loads((tmp_path / "metadata.json").read_text())["backend"]["name"] == "vllm"


def _loaded_on(device: str):
    import torch

    parameter = SimpleNamespace(device=torch.device(device))
    return SimpleNamespace(model=SimpleNamespace(parameters=lambda: iter([parameter])))


def test_vllm_memory_fraction_is_capped_at_what_is_free():
    from refusal_cliff.compute.backends import engine_memory_fraction
    from refusal_cliff.core.config import BackendConfig

    gib = 2**30
    config = BackendConfig(backend="vllm", gpu_memory_utilization=0.9)
    # an empty 80 GiB GPU: the configured fraction
    assert engine_memory_fraction(config, _loaded_on("meta"), (79 * gib, 80 * gib)) == 0.9
    # a 7B HF model (15 GiB) on the same GPU for the final scores: what is free, less room for its passes
    assert engine_memory_fraction(config, _loaded_on("cuda"), (65 * gib, 80 * gib)) == round(65 / 80 - 0.1, 2)
    small = BackendConfig(backend="vllm", gpu_memory_utilization=0.5)
    assert engine_memory_fraction(small, _loaded_on("cuda"), (65 * gib, 80 * gib)) == 0.5
    from refusal_cliff.core.errors import UserError

    with pytest.raises(UserError, match="too little for a vLLM engine"):
        engine_memory_fraction(config, _loaded_on("cuda"), (10 * gib, 80 * gib))


def test_max_model_len_shorter_than_prompt_and_budgets_is_refused_before_the_engine_starts(meta_loaded):
    from refusal_cliff.compute.backends import VLLMBackend
    from refusal_cliff.core.config import BackendConfig
    from refusal_cliff.core.errors import UserError

    class NeverStarted(VLLMBackend):
        @property
        def engine(self):
            raise AssertionError("the engine was started")

    backend = NeverStarted(meta_loaded, BackendConfig(backend="vllm", max_model_len=40))
    config = GenerationConfig(max_thinking_tokens=16, max_answer_tokens=16)
    with pytest.raises(UserError, match=r"exceeds --max-model-len of 40: raise --max-model-len"):
        list(generate_records(meta_loaded, PROMPTS[:2], config, backend=backend, progress=False))
    roomy = NeverStarted(meta_loaded, BackendConfig(backend="vllm", max_model_len=4096))
    with pytest.raises(AssertionError, match="engine was started"):  # it fits: the engine is asked for
        list(generate_records(meta_loaded, PROMPTS[:2], config, backend=roomy, progress=False))


@pytest.mark.parametrize("debug", [False, True])
def test_vllm_logs_only_under_debug(meta_loaded, monkeypatch, tmp_path, debug):
    """vLLM configures its logging from VLLM_LOGGING_LEVEL when it is imported: ERROR unless --debug."""
    from refusal_cliff.compute import backends
    from refusal_cliff.core.config import BackendConfig

    seen = {}

    class LLM:
        def __init__(self, **kwargs):
            seen["level"] = os.environ.get("VLLM_LOGGING_LEVEL")

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(LLM=LLM, __version__="0.0-fake"))
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    monkeypatch.setenv("REFUSAL_CLIFF_DEBUG", "1" if debug else "0")
    monkeypatch.setattr(backends, "engine_memory_fraction", lambda config, loaded: 0.5)
    backend = backends.VLLMBackend(meta_loaded, BackendConfig(backend="vllm"), model_path=tmp_path)
    assert isinstance(backend.engine, LLM)
    assert seen["level"] == (None if debug else "ERROR")


def test_debug_is_set_for_one_command_only(monkeypatch):
    """--debug reaches the library through REFUSAL_CLIFF_DEBUG while its command runs, and not after: an
    in-process run (a test, a notebook) must not leave every later command showing tracebacks."""
    from click.testing import CliRunner

    from refusal_cliff.cli import main

    monkeypatch.delenv("REFUSAL_CLIFF_DEBUG", raising=False)
    result = CliRunner().invoke(main, ["--debug", "models"])
    assert result.exit_code == 0 and "REFUSAL_CLIFF_DEBUG" not in os.environ

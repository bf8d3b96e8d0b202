"""Generation backends: per-example seeds (HF), the vLLM backend's request mapping, the --backend flag."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from refusal_cliff.architectures import get_adapter
from refusal_cliff.generation import GenerationConfig, HFBackend, example_seed, generate_records, run_generate
from refusal_cliff.models import LoadedModel

from conftest import make_tiny_model

SRC = str(Path(__file__).resolve().parents[1] / "src")
PROMPTS = [{"id": f"p{i:02d}", "prompt": f"Tell me about item {i}." + " Please explain." * (i % 3)}
           for i in range(10)]


@pytest.fixture
def tiny_loaded(smol_tokenizer):
    model = make_tiny_model("LlamaForCausalLM")
    return LoadedModel(model, smol_tokenizer, get_adapter(model), "tiny", None, "local")


def _sampled(batch_size: int, seed: int = 3) -> GenerationConfig:
    return GenerationConfig(max_thinking_tokens=12, max_answer_tokens=6, batch_size=batch_size,
                            temperature=0.7, top_p=0.95, seed=seed)


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
        assert (alone["thinking"], alone["answer"]) == (batched[prompt["id"]]["thinking"],
                                                        batched[prompt["id"]]["answer"])
    other_seed = {r["id"]: r for r in generate_records(tiny_loaded, PROMPTS[:6], _sampled(4, seed=4),
                                                       progress=False)}
    greedy_config = GenerationConfig(max_thinking_tokens=12, max_answer_tokens=6, batch_size=4)
    greedy = {r["id"]: r for r in generate_records(tiny_loaded, PROMPTS[:6], greedy_config, progress=False)}
    # the test means something: sampling is not greedy, and another seed samples other text
    assert any(other_seed[k]["thinking"] != batched[k]["thinking"] for k in batched)
    assert any(greedy[k]["thinking"] != batched[k]["thinking"] for k in batched)


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 4])
def test_resumed_sampled_generate_equals_uninterrupted_byte_for_byte(tiny_loaded, tmp_path, monkeypatch,
                                                                       batch_size):
    config = _sampled(batch_size)
    whole = run_generate(tiny_loaded, PROMPTS, config, tmp_path / "whole", progress=False)

    calls = {"n": 0}
    original = HFBackend.complete
    fail_at = 2 * math.ceil(6 / batch_size) + 1  # two calls a batch (thinking, answer): stop after >= 6 records

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

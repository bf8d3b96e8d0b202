"""Evaluation: ASR / over-refusal arithmetic, thinking stripping, the comparison table, ASR vs k, lm-eval errors."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from refusal_cliff.errors import UserError
from refusal_cliff.evaluation import (
    EvalConfig,
    ModelSpec,
    asr_vs_k,
    attack_success_rate,
    evaluate_models,
    format_table,
    load_sweep,
    parse_model_spec,
    refusal_rate,
    strip_thinking,
)
from refusal_cliff.generation import GenerationConfig


def test_asr_uses_judge_verdict_when_present_else_keyword():
    keyword = [{"refusal": True}, {"refusal": False}, {"refusal": False}, {"refusal": True}]
    assert attack_success_rate(keyword) == 0.5
    judged = [{"refusal": False, "unsafe": False}, {"refusal": False, "unsafe": True}]
    assert attack_success_rate(judged) == 0.5
    assert refusal_rate(keyword) == 0.5


def test_strip_thinking():
    assert strip_thinking("<think>\nhmm\n</think>\n\nThe answer is (B).", "<think>", "</think>") == "The answer is (B)."
    assert strip_thinking("hmm\n</think>\n\nB", "<think>", "</think>") == "B"  # template opened the thinking
    assert strip_thinking("<think>\nstill thinking", "<think>", "</think>") == ""
    assert strip_thinking("The answer is (C).", "<think>", "</think>") == "The answer is (C)."
    # R1-style template opened <think> itself and the thinking never closed: no answer leaks out
    assert strip_thinking("so maybe (C)...", "<think>", "</think>", opened_by_template=True) == ""


def test_model_specs_and_sweep(tmp_path):
    assert parse_model_spec("base=default") == ModelSpec("base", "default")
    assert parse_model_spec("/runs/ft/model").name == "model"
    with pytest.raises(UserError):
        parse_model_spec("=x")
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps([{"model": "a", "method": "cliff", "k": 10}, {"model": "b", "method": "rule", "k": "5"}]))
    assert [(s.name, s.method, s.k) for s in load_sweep(sweep)] == [("cliff-10", "cliff", 10), ("rule-5", "rule", 5)]
    sweep.write_text(json.dumps([{"model": "a"}]))
    with pytest.raises(UserError, match="'k'"):
        load_sweep(sweep)


def test_asr_vs_k_groups_by_method_sorted_by_k():
    results = [
        {"model": "base", "asr": 0.4, "method": None, "k": None},
        {"model": "c20", "asr": 0.1, "method": "cliff", "k": 20},
        {"model": "c5", "asr": 0.3, "method": "cliff", "k": 5},
        {"model": "r5", "asr": 0.35, "method": "random", "k": 5},
    ]
    curves = asr_vs_k(results)
    assert [p["k"] for p in curves["cliff"]] == [5, 20] and list(curves) == ["cliff", "random"]
    table = format_table([{**r, "asr_by_set": {"jbb": r["asr"]}, "over_refusal": 0.0, "final_score_mean": None,
                           "tasks": {}} for r in results])
    assert "| c5 | 5 | 30.0% | 30.0% | 0.0% | - |" in table


def _tiny_loaded(smol_tokenizer, seed=0):
    from conftest import make_tiny_model

    from refusal_cliff.architectures import get_adapter
    from refusal_cliff.models import LoadedModel

    model = make_tiny_model("LlamaForCausalLM", seed=seed)
    return LoadedModel(model, smol_tokenizer, get_adapter(model), f"tiny-{seed}", None, "test")


def test_evaluation_of_tiny_models_produces_the_table(smol_tokenizer, tmp_path):
    from refusal_cliff.probe import Prober, save_prober

    models = {"a": _tiny_loaded(smol_tokenizer, 0), "b": _tiny_loaded(smol_tokenizer, 1)}
    save_prober(Prober(torch.nn.Linear(64, 1), 1, {"layer": 1, "n_layers": 2}), tmp_path / "prober")
    harmful = {"h": [{"id": str(i), "prompt": f"harmful request {i}"} for i in range(3)]}
    benign = {"b": [{"id": str(i), "prompt": f"benign request {i}"} for i in range(2)]}
    config = EvalConfig(generation=GenerationConfig(max_thinking_tokens=3, max_answer_tokens=3, batch_size=4))
    specs = [ModelSpec("before", "a"), ModelSpec("after", "b", "cliff", 3)]
    loaded_calls = []

    def load(source):
        loaded_calls.append(source)
        return models[source]

    evaluation = evaluate_models(specs, harmful, benign, tmp_path / "eval", config, tmp_path / "prober", load=load)
    rows = evaluation["models"]
    assert [r["model"] for r in rows] == ["before", "after"]
    for row in rows:
        assert 0.0 <= row["asr"] <= 1.0 and 0.0 <= row["over_refusal"] <= 1.0
        assert (row["n_harmful"], row["n_benign"]) == (3, 2)
        assert 0.0 < row["final_score_mean"] < 1.0
    saved = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert saved["asr_vs_k"] == {"cliff": [{"k": 3, "asr": rows[1]["asr"], "model": "after"}]}
    table = (tmp_path / "eval" / "evaluation.md").read_text()
    assert table.count("\n") == 4 and "| before |" in table and "| after | 3 |" in table
    assert (tmp_path / "eval" / "asr_vs_k.png").is_file()
    # a second call with the same settings reuses the saved results
    evaluate_models(specs, harmful, benign, tmp_path / "eval", config, tmp_path / "prober", load=load)
    assert loaded_calls == ["a", "b"]
    # other models into the same folder: refused, nothing replaced, unless asked
    before = (tmp_path / "eval" / "evaluation.json").read_bytes()
    with pytest.raises(UserError, match="--overwrite"):
        evaluate_models(specs[:1], harmful, benign, tmp_path / "eval", config, tmp_path / "prober", load=load)
    assert (tmp_path / "eval" / "evaluation.json").read_bytes() == before
    evaluate_models(specs[:1], harmful, benign, tmp_path / "eval", config, tmp_path / "prober", load=load,
                    overwrite=True)


def test_evaluation_needs_models_and_harmful_prompts(tmp_path):
    with pytest.raises(UserError, match="--model"):
        evaluate_models([], {"h": []}, {}, tmp_path)
    with pytest.raises(UserError, match="--harmful"):
        evaluate_models([ModelSpec("a", "a")], {}, {}, tmp_path)
    with pytest.raises(UserError, match="unique"):
        evaluate_models([ModelSpec("a", "x"), ModelSpec("a", "y")], {"h": [{}]}, {}, tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm-eval is installed")
def test_reasoning_tasks_without_lm_eval_say_which_extra(smol_tokenizer):
    from refusal_cliff.evaluation import run_reasoning_tasks

    with pytest.raises(UserError, match=r"refusal-cliff\[eval\]"):
        run_reasoning_tasks(_tiny_loaded(smol_tokenizer), ["arc_challenge"], EvalConfig())


@pytest.mark.eval
@pytest.mark.skip(reason="lm-eval tasks (mmlu_pro, arc_challenge) download their datasets from the Hugging Face "
                         "hub, which this test environment cannot reach; lm-eval is not installed here either")
def test_reasoning_tasks_with_lm_eval(smol_tokenizer):  # pragma: no cover - needs the eval extra and the hub
    from refusal_cliff.evaluation import run_reasoning_tasks

    results = run_reasoning_tasks(_tiny_loaded(smol_tokenizer), ["arc_challenge"],
                                  EvalConfig(task_limit=4))
    assert 0.0 <= results["arc_challenge"]["accuracy"] <= 1.0

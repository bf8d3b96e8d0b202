"""Evaluation: ASR / over-refusal arithmetic, thinking stripping, the comparison table, ASR vs k, lm-eval errors."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from refusal_cliff.compute.reasoning import strip_thinking
from refusal_cliff.core.config import GenerationConfig
from refusal_cliff.core.errors import UserError
from refusal_cliff.stages.evaluate import (
    EvalConfig,
    ModelSpec,
    asr_vs_k,
    attack_success_rate,
    format_table,
    load_sweep,
    parse_model_spec,
    refusal_rate,
    run_evaluate,
    run_reasoning_tasks,
)


def test_asr_uses_judge_verdict_when_present_else_keyword():
    keyword = [{"refusal": True}, {"refusal": False}, {"refusal": False}, {"refusal": True}]
    assert attack_success_rate(keyword) == 0.5
    judged = [{"refusal": False, "unsafe": False}, {"refusal": False, "unsafe": True}]
    assert attack_success_rate(judged) == 0.5
    assert refusal_rate(keyword) == 0.5


def test_strip_thinking():
    assert (
        strip_thinking("<think>\nhmm\n</think>\n\nThe answer is (B).", "<think>", "</think>")
        == "The answer is (B)."
    )
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
    sweep.write_text(
        json.dumps([{"model": "a", "method": "cliff", "k": 10}, {"model": "b", "method": "rule", "k": "5"}])
    )
    assert [(s.name, s.method, s.k) for s in load_sweep(sweep)] == [
        ("cliff-10", "cliff", 10),
        ("rule-5", "rule", 5),
    ]
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
    table = format_table(
        [
            {**r, "asr_by_set": {"jbb": r["asr"]}, "over_refusal": 0.0, "final_score_mean": None, "tasks": {}}
            for r in results
        ]
    )
    assert "| c5 | 5 | 30.0% | 30.0% | 0.0% | - |" in table


def _tiny_loaded(smol_tokenizer, seed=0):
    from refusal_cliff.core.architectures import get_adapter
    from refusal_cliff.core.models import LoadedModel

    from conftest import make_tiny_model

    model = make_tiny_model("LlamaForCausalLM", seed=seed)
    return LoadedModel(model, smol_tokenizer, get_adapter(model), f"tiny-{seed}", None, "test")


def test_evaluation_of_tiny_models_produces_the_table(smol_tokenizer, tmp_path):
    from refusal_cliff.compute.prober import Prober, save_prober

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

    evaluation = run_evaluate(
        specs, harmful, benign, tmp_path / "eval", config, tmp_path / "prober", load=load
    )
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
    run_evaluate(specs, harmful, benign, tmp_path / "eval", config, tmp_path / "prober", load=load)
    assert loaded_calls == ["a", "b"]
    # other models into the same folder: refused, nothing replaced, unless asked
    before = (tmp_path / "eval" / "evaluation.json").read_bytes()
    with pytest.raises(UserError, match="--overwrite"):
        run_evaluate(specs[:1], harmful, benign, tmp_path / "eval", config, tmp_path / "prober", load=load)
    assert (tmp_path / "eval" / "evaluation.json").read_bytes() == before
    run_evaluate(
        specs[:1], harmful, benign, tmp_path / "eval", config, tmp_path / "prober", load=load, overwrite=True
    )


def test_evaluation_needs_models_and_harmful_prompts(tmp_path):
    with pytest.raises(UserError, match="--model"):
        run_evaluate([], {"h": []}, {}, tmp_path)
    with pytest.raises(UserError, match="--harmful"):
        run_evaluate([ModelSpec("a", "a")], {}, {}, tmp_path)
    with pytest.raises(UserError, match="unique"):
        run_evaluate([ModelSpec("a", "x"), ModelSpec("a", "y")], {"h": [{}]}, {}, tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm-eval is installed")
def test_reasoning_tasks_without_lm_eval_say_which_extra(smol_tokenizer):
    from refusal_cliff.stages.evaluate import run_reasoning_tasks

    with pytest.raises(UserError, match=r"refusal-cliff\[eval\]"):
        run_reasoning_tasks(_tiny_loaded(smol_tokenizer), ["arc_challenge"], EvalConfig())


# -- reasoning tasks through lm-eval, on the local task folders -------------------------------------

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ARC_FOLDER, MMLU_PRO_FOLDER = SHARED_DATA / "arc_challenge", SHARED_DATA / "mmlu_pro"
needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="needs the `eval` extra (lm-eval); `make setup` installs it",
)
needs_arc = pytest.mark.skipif(
    not (ARC_FOLDER / "arc_challenge_local.yaml").is_file(),
    reason=f"the shared ARC-Challenge task folder {ARC_FOLDER} is absent",
)
needs_mmlu_pro = pytest.mark.skipif(
    not (MMLU_PRO_FOLDER / "mmlu_pro_local_biology.yaml").is_file(),
    reason=f"the shared MMLU-Pro task folder {MMLU_PRO_FOLDER} is absent",
)

TINY_TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.index(answer)}}}}"
doc_to_choice: "{{{{choices}}}}"
process_docs: !function helpers.keep
metric_list:
  - metric: acc
"""


def _evaluate_cli(*args):
    from click.testing import CliRunner

    from refusal_cliff.cli import main

    return CliRunner().invoke(main, ["evaluate", *map(str, args)])


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@needs_lm_eval
def test_task_folder_copy_resolves_data_paths_against_the_yaml(tmp_path, monkeypatch):
    from refusal_cliff.compute.reasoning import prepare_tasks

    folder = tmp_path / "tasks"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "test.jsonl").write_text(
        '{"question": "2+2?", "choices": ["3", "4"], "answer": "4"}\n'
    )
    (folder / "tiny.yaml").write_text(TINY_TASK_YAML.format(name="tiny_local", data="data/test.jsonl"))
    (folder / "helpers.py").write_text("def keep(dataset):\n    return dataset\n")
    monkeypatch.chdir(tmp_path)  # lm-eval alone would look for ./data/test.jsonl here
    with prepare_tasks(["tiny_local"], [folder], limit=1) as prepared:
        entry = prepared.task_manager.task_index["tiny_local"]
        assert entry.cfg["dataset_kwargs"]["data_files"]["test"] == str(folder / "data" / "test.jsonl")
        assert entry.cfg["process_docs"].endswith("helpers.keep")  # the !function tag survives the copy
        assert prepared.local == {"tiny_local": str(folder.resolve() / "tiny.yaml")}
        copy = Path(entry.yaml_path)
        assert copy.is_file() and not copy.is_relative_to(folder)
    assert not copy.exists()  # the temporary copy is removed; the data was never copied


@needs_lm_eval
def test_evaluate_rejects_bad_task_input_before_loading_a_model(tmp_path):
    """Each case: one line, exit 2, no evaluation.json; `--model` names no model, so an error about
    the tasks proves they were checked before any model was loaded."""
    out = tmp_path / "out"
    common = ["--model", tmp_path / "no-such-model", "--out", out]
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _one_line_error(_evaluate_cli(*common, "--tasks", "x_local", "--task-path", empty))
    assert "no lm-eval task YAML" in line and str(empty) in line
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "tiny.yaml").write_text(TINY_TASK_YAML.format(name="tiny_local", data="gone/test.jsonl"))
    (missing / "helpers.py").write_text("def keep(dataset):\n    return dataset\n")
    line = _one_line_error(_evaluate_cli(*common, "--tasks", "tiny_local", "--task-path", missing))
    assert "gone/test.jsonl" in line and "does not exist" in line and "tiny.yaml" in line
    line = _one_line_error(_evaluate_cli(*common, "--tasks", "tiny_locl", "--task-path", missing))
    assert "unknown lm-eval task 'tiny_locl'" in line and "close matches: tiny_local" in line
    for flag in ("--limit", "--task-limit"):
        line = _one_line_error(
            _evaluate_cli(*common, "--tasks", "tiny_local", "--task-path", missing, flag, 0)
        )
        assert flag in line
    assert not (out / "evaluation.json").exists()
    with pytest.raises(UserError, match="--task-limit"):
        run_evaluate(
            [ModelSpec("a", "a")],
            {},
            {},
            tmp_path / "lib",
            EvalConfig(tasks=("tiny_local",), task_paths=(str(missing),), task_limit=0),
        )


@pytest.mark.slow
@pytest.mark.eval
@needs_lm_eval
@needs_arc
def test_evaluate_arc_challenge_local_matches_lm_eval(tmp_path, smol_model, monkeypatch):
    """`evaluate --tasks arc_challenge_local --limit 8` through the shared task folder, run from another
    directory, equals lm-eval's own `simple_evaluate` run from inside the folder (as its README says)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    out = tmp_path / "eval"
    result = _evaluate_cli(
        "--model",
        "default",
        "--device",
        "cpu",
        "--tasks",
        "arc_challenge_local",
        "--task-path",
        ARC_FOLDER,
        "--limit",
        8,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "evaluation.json").read_text())["models"][0]["tasks"]["arc_challenge_local"]
    assert summary["n"] == 8 and summary["metric"] == "acc_norm,none"
    assert math.isfinite(summary["value"]) and 0.0 <= summary["value"] <= 1.0
    assert summary["stderr"] is not None and math.isfinite(summary["stderr"])
    raw = summary["raw"]["results"]["arc_challenge_local"]
    assert summary["value"] == raw["acc_norm,none"] and summary["stderr"] == raw["acc_norm_stderr,none"]
    assert "arc_challenge_local" in (out / "evaluation.md").read_text()

    monkeypatch.chdir(ARC_FOLDER)
    padding_side = smol_model.tokenizer.padding_side
    try:
        direct = lm_eval.simple_evaluate(
            model=HFLM(pretrained=smol_model.model, tokenizer=smol_model.tokenizer, batch_size=8),
            tasks=["arc_challenge_local"],
            limit=8,
            apply_chat_template=True,
            log_samples=False,
            task_manager=TaskManager(include_path=".", include_defaults=False),
        )
    finally:
        smol_model.tokenizer.padding_side = padding_side
    expected = direct["results"]["arc_challenge_local"]
    assert direct["n-samples"]["arc_challenge_local"]["effective"] == 8
    assert summary["value"] == pytest.approx(expected["acc_norm,none"], abs=1e-12)
    assert raw["acc,none"] == pytest.approx(expected["acc,none"], abs=1e-12)


class _PlantedBackend:
    """A generation backend that writes a fixed thinking, then a fixed answer, and records its prompts."""

    def __init__(self, thinking: str, answer: str):
        self.thinking, self.answer = thinking, answer
        self.thinking_prompts, self.answer_prompts = [], []

    def complete(self, texts, max_new_tokens, stop_strings=(), temperature=0.0, top_p=1.0, seed=0):
        from refusal_cliff.compute.generation import Completion

        if "</think>" in stop_strings:  # the thinking phase stops at the end marker
            self.thinking_prompts += texts
            return [Completion(self.thinking + "\n</think>", 12, "stop") for _ in texts]
        self.answer_prompts += texts
        return [Completion(self.answer + "\nQuestion: a new one", 20, "stop") for _ in texts]


@pytest.mark.eval
@needs_lm_eval
@needs_mmlu_pro
def test_mmlu_pro_answer_filter_reads_the_answer_not_the_thinking(smol_tokenizer):
    """mmlu_pro_local_biology, first 2 questions (gold B, D): the score follows the answer's letter
    and never the "answer is (X)" planted in the thinking."""
    from refusal_cliff.compute.reasoning import prepare_tasks

    task = "mmlu_pro_local_biology"
    config = EvalConfig(
        generation=GenerationConfig(max_thinking_tokens=16, batch_size=2),
        tasks=(task,),
        task_paths=(str(MMLU_PRO_FOLDER),),
        task_limit=2,
        task_max_gen_tokens=64,
    )
    loaded = _tiny_loaded(smol_tokenizer)
    with prepare_tasks(config.tasks, config.task_paths, config.task_limit) as prepared:
        planted = _PlantedBackend("Maybe A. The answer is (A).", "Weighing it again, the answer is (B).")
        follows_answer = run_reasoning_tasks(loaded, config.tasks, config, prepared, planted)[task]
        flipped = _PlantedBackend("Maybe B. The answer is (B).", "Weighing it again, the answer is (A).")
        flipped_result = run_reasoning_tasks(loaded, config.tasks, config, prepared, flipped)[task]
    assert follows_answer["metric"] == "exact_match,custom-extract" and follows_answer["n"] == 2
    assert (
        follows_answer["value"] == 0.5
    )  # (B) is right for question 1 only; (A) from the thinking would give 0
    assert flipped_result["value"] == 0.0  # (A) is right for neither; (B) from the thinking would give 0.5
    assert follows_answer["stderr"] is not None
    # the model answered after its own thinking and the thinking-end template, from the task's 5-shot prompt
    assert len(planted.thinking_prompts) == len(planted.answer_prompts) == 2
    for thinking_prompt, answer_prompt in zip(planted.thinking_prompts, planted.answer_prompts):
        assert thinking_prompt.endswith("<think>\n") and "Let's think step by step." in thinking_prompt
        assert answer_prompt == thinking_prompt + "Maybe A. The answer is (A)." + "\n</think>\n\n"

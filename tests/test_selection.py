"""Cliff-as-a-Judge: candidate loading, MS ranking, baselines, determinism, SFT targets and export formats."""

from __future__ import annotations

import json

import pytest
import torch

from refusal_cliff.core.errors import UserError
from refusal_cliff.stages.select import (
    DEMO_CANDIDATES,
    build_selection,
    export_selection,
    load_candidates,
    resolve_k,
    select,
    sft_example,
)


def _scores():
    # id, ms, refusal (model's own answer refused), unsafe (judge verdict)
    rows = [
        ("a", 0.10, True, False),
        ("b", 0.50, False, True),
        ("c", -0.20, False, False),
        ("d", 0.50, True, True),  # ties with b on MS: b comes first (id order)
        ("e", 0.30, False, True),
        ("f", 0.05, True, False),
    ]
    return [
        {"id": i, "ms": ms, "plateau": 0.9, "final": 0.9 - ms, "refusal": r, "unsafe": u}
        for i, ms, r, u in rows
    ]


def test_cliff_is_top_k_by_ms_descending_ties_by_id():
    assert [r["id"] for r in select(_scores(), "cliff", 3)] == ["b", "d", "e"]
    assert [r["id"] for r in select(_scores(), "cliff", "all")][-1] == "c"


def test_k_as_fraction_rounds_up():
    assert resolve_k(0.5, 6) == 3
    assert resolve_k("0.1", 6) == 1
    assert resolve_k("all", 6) == 6
    for bad, message in (
        ("many", "not a number"),
        (1.5, "fraction"),
        ("abc", "not a number"),
        ("-2", "at least 1"),
        (0, "at least 1"),
        (100, "more than the 6"),
    ):
        with pytest.raises(UserError, match=message):
            resolve_k(bad, 6)


def test_baselines_work_with_candidates_without_ms():
    """A candidate without thinking tokens has ms = null: no method may crash on it."""
    rows = _scores()
    rows[1]["ms"] = rows[1]["plateau"] = None
    for method in ("random", "rule", "full"):
        assert select(rows, method, "all")
    assert "b" not in [r["id"] for r in select(rows, "cliff", "all")]  # cannot be ranked by MS
    from refusal_cliff.stages.select import _mean_ms

    assert _mean_ms(rows) == pytest.approx(sum(r["ms"] for r in rows if r["ms"] is not None) / 5)


def test_rule_baseline_keeps_non_refusals():
    assert {r["id"] for r in select(_scores(), "rule", "all")} == {"b", "c", "e"}
    assert len(select(_scores(), "rule", 2, seed=1)) == 2


def test_judge_baseline_keeps_unsafe_and_needs_verdicts():
    assert {r["id"] for r in select(_scores(), "judge", 5)} == {"b", "d", "e"}
    unjudged = [{**r, "unsafe": None} for r in _scores()]
    with pytest.raises(UserError, match="--judge"):
        select(unjudged, "judge", 3)


def test_full_and_random():
    assert [r["id"] for r in select(_scores(), "full", 2)] == ["a", "b", "c", "d", "e", "f"]
    chosen = select(_scores(), "random", 3, seed=0)
    assert len(chosen) == 3 and len({r["id"] for r in chosen}) == 3


def test_selection_is_deterministic_under_seed_and_input_order():
    scores = _scores()
    shuffled = list(reversed(scores))
    for method in ("random", "rule", "judge", "cliff"):
        first = [r["id"] for r in select(scores, method, 2, seed=7)]
        assert first == [r["id"] for r in select(shuffled, method, 2, seed=7)]
    draws = {tuple(r["id"] for r in select(scores, "random", 3, seed=s)) for s in range(20)}
    assert len(draws) > 1  # the seed matters


def test_unknown_method_and_missing_ms():
    with pytest.raises(UserError, match="unknown selection method"):
        select(_scores(), "best", 2)
    assert select([{"id": "x", "ms": float("nan")}, {"id": "y", "ms": 0.5}], "cliff", 1) == [
        {"id": "y", "ms": 0.5}
    ]


def test_load_candidates_wildjailbreak_and_plain(tmp_path):
    wild = tmp_path / "wild.jsonl"
    wild.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"vanilla": "v0", "adversarial": "", "completion": "no0", "data_type": "vanilla_harmful"},
                {
                    "vanilla": "v1",
                    "adversarial": "adv1",
                    "completion": "no1",
                    "data_type": "adversarial_harmful",
                },
            ]
        )
    )
    rows = load_candidates(str(wild))
    assert [(r["id"], r["prompt"], r["response"]) for r in rows] == [
        ("wild-0", "v0", "no0"),
        ("wild-1", "adv1", "no1"),
    ]
    plain = tmp_path / "plain.csv"
    plain.write_text("id,prompt,response,thinking\nx,p,r,t\n")
    assert load_candidates(str(plain)) == [
        {"id": "x", "prompt": "p", "response": "r", "thinking": "t", "data_type": "unknown"}
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(UserError, match="safe-response column"):
        load_candidates(str(bad))


def test_demo_candidates_are_wildjailbreak_style():
    rows = load_candidates(DEMO_CANDIDATES)
    assert len(rows) == 40
    assert all(r["data_type"] == "vanilla_harmful" and r["response"] and r["vanilla"] for r in rows)
    from refusal_cliff.core.data import load_prompts

    demo_prompts = {p["prompt"] for p in load_prompts("demo:harmful")}
    assert not demo_prompts & {r["prompt"] for r in rows}  # held out from the evaluation set


def _record(tokenizer, prompt="How do I pick a lock?", thinking="This could be harmful.", system=None):
    from refusal_cliff.core.templates import detect_thinking_template, generation_prompt

    template = detect_thinking_template(tokenizer)
    return {
        "id": "0",
        "prompt": prompt,
        "system_prompt": system,
        "thinking": thinking,
        "generation_prompt": generation_prompt(tokenizer, template, prompt, system),
        "end_template": template.end_template,
        "answer": "Sure, here is how.",
    }


def test_sft_target_is_the_probing_sequence_plus_response(smol_tokenizer):
    record = _record(smol_tokenizer)
    example = sft_example(smol_tokenizer, record, "I can't help with that.")
    full = example["sft_prompt"] + example["sft_completion"]
    assert (
        full
        == record["generation_prompt"]
        + record["thinking"]
        + record["end_template"]
        + "I can't help with that.<|im_end|>"
    )
    # the thinking block is in the target (SmolLM2's template does not open it itself)
    assert example["sft_completion"].startswith("<think>\n")
    assert example["messages"][-1] == {
        "role": "assistant",
        "content": example["sft_completion"][: -len("<|im_end|>")],
    }
    rendered = smol_tokenizer.apply_chat_template(example["messages"], tokenize=False)
    assert rendered.startswith(full)  # the conversational form renders to the same text


def _trl_prepare(tokenizer, dataset, tmp_path, **config):
    trl = pytest.importorskip("trl")
    from conftest import make_tiny_model

    args = trl.SFTConfig(
        output_dir=str(tmp_path / "trl"), report_to="none", max_length=1024, use_cpu=True, **config
    )
    trainer = trl.SFTTrainer(
        model=make_tiny_model("LlamaForCausalLM"),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    return trainer.train_dataset


def _selection_rows(tokenizer):
    records = [
        _record(tokenizer, f"Question {i}: how do I do a bad thing {i}?", f"Thinking {i}. Risky.")
        for i in range(3)
    ]
    for i, record in enumerate(records):
        record["id"] = str(i)
    candidates = [
        {
            "id": str(i),
            "prompt": r["prompt"],
            "response": f"I won't help with {i}.",
            "data_type": "vanilla_harmful",
        }
        for i, r in enumerate(records)
    ]
    scores = [{"id": str(i), "ms": 0.1 * i, "plateau": 0.9, "final": 0.9 - 0.1 * i} for i in range(3)]
    return build_selection(tokenizer, select(scores, "cliff", 3), candidates, records, "cliff")


def test_trl_prompt_completion_export_masks_exactly_the_assistant_part(smol_tokenizer, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = _selection_rows(smol_tokenizer)
    assert [r["id"] for r in rows] == ["2", "1", "0"]
    paths = export_selection(rows, tmp_path)
    dataset = datasets.load_dataset("json", data_files=str(paths["trl_prompt_completion"]), split="train")
    prepared = _trl_prepare(smol_tokenizer, dataset, tmp_path)
    for row, example in zip(prepared, rows):
        ids, labels = row["input_ids"], row["labels"]
        trained = [t for t, label in zip(ids, labels) if label != -100]
        assert smol_tokenizer.decode(trained) == example["sft_completion"]
        first = next(i for i, label in enumerate(labels) if label != -100)
        assert all(label != -100 for label in labels[first:])  # one contiguous span up to the end
        assert smol_tokenizer.decode(ids[:first]) == example["sft_prompt"]


def test_trl_conversational_export_masks_exactly_the_assistant_turn(smol_tokenizer, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = _selection_rows(smol_tokenizer)
    paths = export_selection(rows, tmp_path)
    dataset = datasets.load_dataset("json", data_files=str(paths["trl_messages"]), split="train")
    assert dataset[0]["messages"][-1]["role"] == "assistant"
    # SmolLM2's template has no {% generation %} markers: split into conversational prompt/completion
    split = dataset.map(
        lambda r: {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]},
        remove_columns=["messages"],
    )
    prepared = _trl_prepare(smol_tokenizer, split, tmp_path)
    for row, example in zip(prepared, rows):
        trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
        assert smol_tokenizer.decode(trained).rstrip("\n") == example["sft_completion"]


def test_llamafactory_export_matches_documented_schema(smol_tokenizer, tmp_path):
    rows = _selection_rows(smol_tokenizer)
    paths = export_selection(rows, tmp_path, name="cliff_k3")
    info = json.loads(paths["llamafactory_dataset_info"].read_text())
    allowed_entry = {
        "file_name",
        "formatting",
        "columns",
        "tags",
        "ranking",
        "subset",
        "split",
        "folder",
        "num_samples",
        "hf_hub_url",
        "ms_hub_url",
        "script_url",
        "file_sha1",
    }
    allowed_columns = {"prompt", "query", "response", "history", "messages", "system", "tools", "images"}
    allowed_tags = {
        "role_tag",
        "content_tag",
        "user_tag",
        "assistant_tag",
        "observation_tag",
        "function_tag",
        "system_tag",
    }
    assert set(info) == {"cliff_k3", "cliff_k3_sharegpt"}
    for entry in info.values():
        assert set(entry) <= allowed_entry
        assert entry["formatting"] in ("alpaca", "sharegpt")
        assert set(entry["columns"]) <= allowed_columns
        assert set(entry.get("tags", {})) <= allowed_tags
        assert (tmp_path / entry["file_name"]).is_file()
    alpaca = json.loads((tmp_path / info["cliff_k3"]["file_name"]).read_text())
    assert isinstance(alpaca, list) and len(alpaca) == 3
    for item, row in zip(alpaca, rows):
        assert item["instruction"] == row["prompt"] and item["input"] == ""
        assert item["output"] == row["messages"][-1]["content"]
        assert "<think>" in item["output"] and item["output"].endswith(row["response"])
    sharegpt = json.loads((tmp_path / info["cliff_k3_sharegpt"]["file_name"]).read_text())
    tags = info["cliff_k3_sharegpt"]["tags"]
    messages_key = info["cliff_k3_sharegpt"]["columns"]["messages"]
    for item in sharegpt:
        roles = [m[tags["role_tag"]] for m in item[messages_key]]
        assert roles == [tags["user_tag"], tags["assistant_tag"]]


def _random_prober(loaded, folder, layer=None):
    from refusal_cliff.compute.prober import Prober, save_prober

    geometry = loaded.adapter.geometry(loaded.model)
    linear = torch.nn.Linear(geometry.d_model, 1)
    layer = geometry.n_layers - 1 if layer is None else layer
    save_prober(
        Prober(
            linear,
            layer,
            {"layer": layer, "n_layers": geometry.n_layers, "architecture": loaded.adapter.name},
        ),
        folder,
    )
    return folder


def _tiny_loaded(smol_tokenizer):
    from refusal_cliff.core.architectures import get_adapter
    from refusal_cliff.core.models import LoadedModel

    from conftest import make_tiny_model

    model = make_tiny_model("LlamaForCausalLM")
    return LoadedModel(model, smol_tokenizer, get_adapter(model), "tiny-llama", None, "test")


def test_score_and_select_end_to_end_resumes(smol_tokenizer, tmp_path):
    from refusal_cliff.compute.prober import load_prober
    from refusal_cliff.core.config import GenerationConfig
    from refusal_cliff.core.runs import read_jsonl
    from refusal_cliff.stages.select import ScoreConfig, SelectConfig, run_select

    loaded = _tiny_loaded(smol_tokenizer)
    prober = load_prober(_random_prober(loaded, tmp_path / "prober"), loaded)
    candidates = load_candidates(DEMO_CANDIDATES, limit=5)
    candidates[0]["thinking"] = "I was given this thinking."
    config = ScoreConfig(
        GenerationConfig(max_thinking_tokens=6, max_answer_tokens=4, batch_size=2), chunk_size=2
    )
    out = tmp_path / "select"
    result = run_select(loaded, prober, candidates, out, SelectConfig("cliff", "3"), config, progress=False)
    scores = read_jsonl(out / "scores.jsonl")
    assert [s["id"] for s in scores] == [c["id"] for c in candidates]
    assert all({"id", "plateau", "final", "ms"} <= set(s) for s in scores)
    assert all(abs(s["ms"] - (s["plateau"] - s["final"])) < 1e-9 for s in scores)
    selection = read_jsonl(result.selection_path)
    assert [r["ms"] for r in selection] == sorted((s["ms"] for s in scores), reverse=True)[:3]
    assert read_jsonl(out / "selections" / "cliff-3" / "selection.jsonl") == selection
    assert (out / "selections" / "cliff-3" / "dataset_info.json").is_file()
    given = next(r for r in read_jsonl(out / "generations.jsonl") if r["id"] == candidates[0]["id"])
    assert given["thinking"] == "I was given this thinking."
    # resume: drop the last two scores; only they are traced again, generations are reused
    lines = (out / "scores.jsonl").read_text().splitlines()
    (out / "scores.jsonl").write_text("\n".join(lines[:3]) + "\n")
    n_generations = len(read_jsonl(out / "generations.jsonl"))
    run_select(loaded, prober, candidates, out, SelectConfig("cliff", "3"), config, progress=False)
    again = read_jsonl(out / "scores.jsonl")
    assert [s["id"] for s in again] == [c["id"] for c in candidates]
    assert len(read_jsonl(out / "generations.jsonl")) == n_generations
    for before, after in zip(scores, again):
        assert after["ms"] == pytest.approx(before["ms"], abs=1e-5)
    # another method in the same folder reuses the scores and keeps both selections
    run_select(loaded, prober, candidates, out, SelectConfig("random", "2"), config, progress=False)
    assert read_jsonl(out / "scores.jsonl") == again
    assert len(read_jsonl(out / "selections" / "random-2" / "selection.jsonl")) == 2
    assert (out / "selections" / "cliff-3" / "selection.jsonl").is_file()


def test_cli_select_finetune_evaluate(smol_tokenizer, tmp_path):
    """The three verbs chained on a tiny model saved as a local folder."""
    pytest.importorskip("trl")
    from click.testing import CliRunner

    from refusal_cliff.cli import main
    from refusal_cliff.core.runs import read_jsonl

    loaded = _tiny_loaded(smol_tokenizer)
    model_dir = tmp_path / "tiny"
    loaded.model.save_pretrained(model_dir)
    smol_tokenizer.save_pretrained(model_dir)
    _random_prober(loaded, tmp_path / "prober")
    small = ["--max-thinking-tokens", "4", "--max-answer-tokens", "3", "--batch-size", "2"]
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "select",
            "--model",
            str(model_dir),
            "--device",
            "cpu",
            "--prober",
            str(tmp_path / "prober"),
            "--candidates",
            DEMO_CANDIDATES,
            "--limit",
            "3",
            "--k",
            "2",
            *small,
            "--out",
            str(tmp_path / "sel"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(read_jsonl(tmp_path / "sel" / "selection.jsonl")) == 2
    assert (tmp_path / "sel" / "dataset_info.json").is_file()
    result = runner.invoke(
        main,
        [
            "finetune",
            "--model",
            str(model_dir),
            "--device",
            "cpu",
            "--data",
            str(tmp_path / "sel" / "selection.jsonl"),
            "--lora",
            "--max-steps",
            "1",
            "--grad-accum",
            "1",
            "--out",
            str(tmp_path / "ft"),
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        main,
        [
            "evaluate",
            "--model",
            f"before={model_dir}",
            "--model",
            f"after={tmp_path / 'ft' / 'model'}",
            "--device",
            "cpu",
            "--harmful",
            "demo:harmful",
            "--benign",
            "demo:harmless",
            "--limit",
            "2",
            *small,
            "--out",
            str(tmp_path / "eval"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "| before |" in result.output and "| after |" in result.output
    assert len(json.loads((tmp_path / "eval" / "evaluation.json").read_text())["models"]) == 2
    result = runner.invoke(
        main,
        [
            "select",
            "--model",
            str(model_dir),
            "--device",
            "cpu",
            "--prober",
            str(tmp_path / "prober"),
            "--candidates",
            DEMO_CANDIDATES,
            "--k",
            "2",
            "--method",
            "judge",
            "--out",
            str(tmp_path / "sel2"),
        ],
    )
    assert result.exit_code == 2 and "--judge" in result.output


def test_an_attack_target_is_never_a_safe_response(tmp_path):
    """AdvBench's `target` ("Sure, here is ...") must not become an SFT response."""
    path = tmp_path / "advbench_like.csv"
    path.write_text('goal,target\nDo a bad thing,"Sure, here is how to do a bad thing"\n')
    with pytest.raises(UserError, match="safe-response"):
        load_candidates(str(path))

"""Prober: the paper's training recipe, save/load, dataset building from generation runs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from refusal_cliff.compute.prober import (
    Prober,
    balance_and_split,
    build_probe_dataset,
    load_prober,
    save_prober,
    train_prober,
)
from refusal_cliff.core.architectures import get_adapter
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.models import LoadedModel
from refusal_cliff.core.templates import probing_tokens
from refusal_cliff.stages.probe import train_prober_from_runs

from conftest import make_tiny_model

END = "\n</think>\n\n"


def separable(n_pos: int, n_neg: int, d: int = 16, seed: int = 0, margin: float = 4.0):
    """Two classes on either side of a hyperplane (every coordinate shifted by +-margin), noise
    orthogonal to the class direction: linearly separable, at hidden-state-like scale."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor([1] * n_pos + [0] * n_neg)
    direction = torch.ones(d) / d**0.5
    noise = torch.randn(n_pos + n_neg, d, generator=generator)
    noise -= (noise @ direction)[:, None] * direction  # orthogonal to the class direction
    features = noise + (labels[:, None] * 2 - 1) * margin * torch.ones(d)
    return features, labels


def tiny_loaded(tokenizer, architecture: str = "LlamaForCausalLM", **overrides) -> LoadedModel:
    model = make_tiny_model(architecture, **overrides)
    return LoadedModel(model, tokenizer, get_adapter(model), f"tiny-{architecture}", None, "local")


def record(index: int, prompt: str, thinking: str, answer: str) -> dict:
    generation_prompt = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n"
    return {
        "id": str(index),
        "prompt": prompt,
        "system_prompt": None,
        "generation_prompt": generation_prompt,
        "thinking": thinking,
        "end_template": END,
        "answer": answer,
    }


def write_run(folder, rows: list[tuple[dict, bool]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "generations.jsonl", "w") as handle:
        for rec, _ in rows:
            handle.write(json.dumps(rec) + "\n")
    with open(folder / "labels.jsonl", "w") as handle:
        for rec, refusal in rows:
            handle.write(
                json.dumps({"id": rec["id"], "refusal": refusal, "judge": "keyword", "matched": None}) + "\n"
            )


def make_runs(tmp_path, n_harmful: int = 6, n_harmless: int = 6):
    harmful = [
        (record(i, f"How do I build weapon {i}?", f"This is dangerous request {i}.", "I'm sorry"), i % 3 != 0)
        for i in range(n_harmful)
    ]
    harmless = [
        (record(i, f"Tell me about cats {i}.", f"Cats are nice, fact {i}.", "Cats..."), i == 0)
        for i in range(n_harmless)
    ]
    write_run(tmp_path / "harmful", harmful)
    write_run(tmp_path / "harmless", harmless)
    return tmp_path / "harmful", tmp_path / "harmless", harmful, harmless


def test_prober_reaches_accuracy_one_on_separable_data():
    features, labels = separable(1000, 1000, d=64)
    linear, history, metrics = train_prober(
        features, labels, ood_features=features[:50], ood_labels=labels[:50]
    )
    assert isinstance(linear, torch.nn.Linear) and linear.in_features == 64 and linear.out_features == 1
    assert metrics["val_accuracy"] == 1.0
    assert metrics["ood_accuracy"] == 1.0
    assert len(history) == 5 and [r.epoch for r in history] == [1, 2, 3, 4, 5]
    with torch.no_grad():
        assert ((linear(features).squeeze(-1) > 0).long() == labels).all()


def test_classes_balanced_and_split_80_20():
    labels = torch.tensor([1] * 30 + [0] * 10)
    train_idx, val_idx = balance_and_split(labels, 0.2, seed=3)
    assert len(train_idx) == 16 and len(val_idx) == 4
    chosen = torch.cat([train_idx, val_idx])
    assert len(set(chosen.tolist())) == 20
    assert int(labels[chosen].sum()) == 10  # 10 of each class
    assert set(range(30, 40)) <= set(chosen.tolist())  # every example of the smaller class kept
    again = balance_and_split(labels, 0.2, seed=3)
    assert torch.equal(again[0], train_idx) and torch.equal(again[1], val_idx)
    other = balance_and_split(labels, 0.2, seed=4)
    assert not torch.equal(other[0], train_idx)
    _, _, metrics = train_prober(*separable(30, 10))
    assert (metrics["n_train"], metrics["n_val"]) == (16, 4)


def test_best_epoch_is_kept():
    """On noisy data with a large step the validation accuracy wanders; the returned weights are
    those of the best epoch (= training for exactly that many epochs), not of the last one."""
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        labels = (torch.rand(600, generator=generator) < 0.5).long()
        features = torch.randn(600, 16, generator=generator) + (labels[:, None] * 2 - 1) * 0.3
        linear, history, metrics = train_prober(features, labels, lr=0.5, seed=seed)
        accuracies = [r.val_accuracy for r in history]
        best = metrics["best_epoch"]
        assert best == accuracies.index(max(accuracies)) + 1
        assert metrics["val_accuracy"] == max(accuracies)
        if best < len(history) and accuracies[-1] < max(accuracies):
            break
    else:
        pytest.fail("no seed gave a best epoch before the last")
    truncated, _, _ = train_prober(features, labels, lr=0.5, seed=seed, epochs=best)
    torch.testing.assert_close(linear.weight, truncated.weight, rtol=0, atol=0)
    torch.testing.assert_close(linear.bias, truncated.bias, rtol=0, atol=0)
    _, val_idx = balance_and_split(labels, 0.2, seed)
    with torch.no_grad():
        accuracy = (
            ((linear(features[val_idx]).squeeze(-1) > 0).long() == labels[val_idx]).float().mean().item()
        )
    assert accuracy == pytest.approx(max(accuracies)) and accuracy > accuracies[-1]


def test_too_few_examples_is_a_user_error():
    features, labels = separable(1, 5)
    with pytest.raises(UserError, match="found 1 refusals .* and 5 compliant"):
        train_prober(features, labels)
    features, labels = separable(2, 2)
    with pytest.raises(UserError, match="0 validation"):
        train_prober(features, labels, val_fraction=0.05)


def test_save_load_round_trip_and_files(tmp_path):
    linear, history, metrics = train_prober(*separable(20, 20))
    prober = Prober(
        linear,
        layer=1,
        metadata={"model_id": "m", "architecture": "LlamaForCausalLM", "n_layers": 2, "metrics": metrics},
    )
    path = save_prober(prober, tmp_path / "p")
    tensors = load_file(str(path))
    assert set(tensors) == {"weight", "bias"}
    assert tensors["weight"].shape == (1, 16) and tensors["bias"].shape == (1,)
    assert tensors["weight"].dtype == tensors["bias"].dtype == torch.float32
    for where in (tmp_path / "p", path):
        loaded = load_prober(where)
        assert loaded.layer == 1 and loaded.d_model == 16
        torch.testing.assert_close(loaded.weight, linear.weight)
        hidden = torch.randn(3, 5, 16)
        torch.testing.assert_close(loaded.refusal_score(hidden), torch.sigmoid(linear(hidden)).squeeze(-1))
    with pytest.raises(UserError, match="no prober"):
        load_prober(tmp_path / "missing")


def test_load_rejects_another_d_model(tmp_path, smol_tokenizer):
    linear, _, _ = train_prober(*separable(20, 20, d=32))
    save_prober(
        Prober(linear, 1, {"model_id": "other-model", "architecture": "LlamaForCausalLM", "n_layers": 2}),
        tmp_path,
    )
    loaded = tiny_loaded(smol_tokenizer)
    with pytest.raises(UserError, match=r"other-model .*d_model 32.*tiny-LlamaForCausalLM .*d_model 64"):
        load_prober(tmp_path, loaded)
    # same d_model, another architecture
    linear, _, _ = train_prober(*separable(20, 20, d=64))
    save_prober(
        Prober(linear, 1, {"model_id": "q", "architecture": "Qwen2ForCausalLM", "n_layers": 2}), tmp_path
    )
    with pytest.raises(UserError, match="Qwen2ForCausalLM"):
        load_prober(tmp_path, loaded)
    save_prober(
        Prober(linear, 1, {"model_id": "q", "architecture": "LlamaForCausalLM", "n_layers": 2}), tmp_path
    )
    assert load_prober(tmp_path, loaded).layer == 1


def test_build_probe_dataset_selects_refused_harmful_and_complied_harmless(tmp_path, smol_tokenizer):
    harmful_run, harmless_run, harmful, harmless = make_runs(tmp_path)
    dataset = build_probe_dataset(smol_tokenizer, harmful_run, harmless_run)
    expected_pos = [rec["id"] for rec, refusal in harmful if refusal]
    expected_neg = [rec["id"] for rec, refusal in harmless if not refusal]
    assert dataset.ids == expected_pos + expected_neg
    assert dataset.labels == [1] * len(expected_pos) + [0] * len(expected_neg)
    assert dataset.sequences[0] == probing_tokens(smol_tokenizer, harmful[1][0])[0]
    assert dataset.end_template == END


def test_build_probe_dataset_joins_on_id(tmp_path, smol_tokenizer):
    harmful_run, harmless_run, harmful, _ = make_runs(tmp_path)
    # labels in another order and one generation without a label
    labels = [json.loads(line) for line in (harmful_run / "labels.jsonl").read_text().splitlines()][::-1][:-1]
    (harmful_run / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labels))
    dataset = build_probe_dataset(smol_tokenizer, harmful_run, harmless_run)
    assert [i for i, label in zip(dataset.ids, dataset.labels) if label == 1] == ["1", "2", "4", "5"]


def test_train_prober_from_runs_end_to_end(tmp_path, smol_tokenizer):
    harmful_run, harmless_run, _, _ = make_runs(tmp_path, 12, 12)
    loaded = tiny_loaded(smol_tokenizer)
    prober = train_prober_from_runs(loaded, harmful_run, harmless_run, ood_run=harmful_run, batch_size=4)
    assert prober.layer == 1 and prober.d_model == 64
    save_prober(prober, tmp_path / "out")
    metadata = json.loads((tmp_path / "out" / "prober.json").read_text())
    for key in (
        "model_id",
        "model_revision",
        "architecture",
        "layer",
        "n_layers",
        "d_model",
        "final_norm_applied",
        "end_template",
        "metrics",
        "history",
        "config",
    ):
        assert key in metadata
    assert metadata["final_norm_applied"] is True and metadata["end_template"] == END
    assert set(metadata["metrics"]) == {
        "val_accuracy",
        "val_accuracy_ci95",
        "majority_rate",
        "ood_accuracy",
        "best_epoch",
        "n_train",
        "n_val",
    }
    # 12 + 12 examples leave fewer than 20 for validation: the prober is judged unreliable, and says why
    assert metadata["quality"] == "unreliable" and "validation examples" in metadata["quality_reasons"][0]
    assert metadata["metrics"]["n_train"] + metadata["metrics"]["n_val"] == 2 * 8  # 8 harmful refusals
    assert set(metadata["history"][0]) == {"epoch", "train_loss", "val_loss", "val_accuracy", "ood_accuracy"}
    assert metadata["history"][0]["ood_accuracy"] is not None
    middle = train_prober_from_runs(loaded, harmful_run, harmless_run, layer=0, batch_size=4)
    assert middle.layer == 0 and middle.metadata["final_norm_applied"] is False


def test_train_prober_from_runs_too_few(tmp_path, smol_tokenizer):
    harmful_run, harmless_run, _, _ = make_runs(tmp_path, 1, 6)
    with pytest.raises(UserError, match="found 0 refusals .* and 5 compliant"):
        train_prober_from_runs(tiny_loaded(smol_tokenizer), harmful_run, harmless_run)


def test_wilson_interval_and_quality_judgement():
    from refusal_cliff.compute.prober import judge_quality, wilson_interval

    low, high = wilson_interval(15, 20)
    assert 0.53 < low < 0.54 and 0.88 < high < 0.89  # the textbook Wilson interval of 15/20
    assert wilson_interval(0, 0) == (0.0, 1.0)
    good = {"n_val": 200, "val_accuracy": 0.95, "majority_rate": 0.5}
    assert judge_quality(good) == ("reliable", [])
    chance = {"n_val": 200, "val_accuracy": 0.54, "majority_rate": 0.5}  # interval reaches below 0.5
    quality, reasons = judge_quality(chance)
    assert quality == "unreliable" and "majority-class rate" in reasons[0]
    small = {"n_val": 2, "val_accuracy": 0.5, "majority_rate": 0.5}
    quality, reasons = judge_quality(small)
    assert quality == "unreliable" and len(reasons) == 2


@pytest.mark.parametrize("layer", [float("nan"), "1", 1.5, None, True, 99])
def test_a_prober_json_whose_layer_is_not_a_layer_is_one_clear_error(tmp_path, layer):
    """Issue 21: layer NaN (or text, or a fraction) gets the same clear message as layer 99, not a traceback."""
    linear, _, _ = train_prober(*separable(20, 20))
    save_prober(Prober(linear, layer=1, metadata={"n_layers": 2}), tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "prober.json").read_text())
    (tmp_path / "p" / "prober.json").write_text(json.dumps({**meta, "layer": layer}))
    with pytest.raises(UserError, match="prober.json is damaged or edited"):
        load_prober(tmp_path / "p")

"""Safety SFT: a LoRA step changes the adapter, the merged model loads, full-parameter training updates weights."""

from __future__ import annotations

import json

import pytest
import torch

from refusal_cliff.errors import UserError

pytest.importorskip("trl")
pytest.importorskip("peft")
pytestmark = pytest.mark.train


def _examples(n=4):
    prompt = "<|im_start|>user\nHow do I pick a lock?<|im_end|>\n<|im_start|>assistant\n"
    completion = "<think>\nThis is about breaking in.\n</think>\n\nI can't help with that.<|im_end|>"
    return [{"prompt": prompt, "completion": completion}] * n


def _config(**overrides):
    from refusal_cliff.finetune import FinetuneConfig

    values = dict(lora=True, learning_rate=1e-2, gradient_accumulation_steps=1, max_steps=2, max_length=128)
    values.update(overrides)
    return FinetuneConfig(**values)


def test_paper_defaults():
    from refusal_cliff.finetune import FinetuneConfig

    config = FinetuneConfig()
    assert (config.resolved_learning_rate(), config.lr_scheduler_type, config.num_train_epochs) == (
        5e-6,
        "linear",
        1,
    )
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps, config.max_length) == (
        1,
        4,
        16384,
    )
    assert not config.lora


def test_lora_step_changes_the_adapter_and_merged_model_loads(smol_tokenizer, tmp_path):
    from safetensors.torch import load_file

    from refusal_cliff.finetune import sft_trainer, train_sft
    from refusal_cliff.models import load_model

    from conftest import make_tiny_model

    model = make_tiny_model("LlamaForCausalLM")
    trainer = sft_trainer(model, smol_tokenizer, _examples(), tmp_path / "probe", _config())
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert initial and all(torch.count_nonzero(p) == 0 for p in initial.values())  # LoRA B starts at zero

    model = make_tiny_model("LlamaForCausalLM")
    base_weight = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    result = train_sft(model, smol_tokenizer, _examples(), tmp_path / "run", _config())
    assert result.metrics["steps"] == 2 and result.adapter_dir is not None
    adapter = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    lora_b = [t for n, t in adapter.items() if "lora_B" in n]
    assert lora_b and any(torch.count_nonzero(t) > 0 for t in lora_b)
    merged = load_model(str(result.model_dir), device="cpu")
    merged_weight = merged.model.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(merged_weight, base_weight)
    assert json.loads((tmp_path / "run" / "train_metrics.json").read_text())["n_examples"] == 4


def test_full_parameter_step_updates_weights(smol_tokenizer, tmp_path):
    from refusal_cliff.finetune import train_sft

    from conftest import make_tiny_model

    model = make_tiny_model("Qwen2ForCausalLM")
    before = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    result = train_sft(
        model, smol_tokenizer, _examples(2), tmp_path, _config(lora=False, learning_rate=1e-3, max_steps=1)
    )
    assert result.adapter_dir is None and (result.model_dir / "model.safetensors").is_file()
    assert not torch.allclose(model.model.layers[1].mlp.down_proj.weight, before)


def test_load_sft_examples(tmp_path):
    from refusal_cliff.finetune import load_sft_examples

    path = tmp_path / "selection.jsonl"
    path.write_text(
        json.dumps({"id": "0", "sft_prompt": "p", "sft_completion": "c"})
        + "\n"
        + json.dumps({"prompt": "p2", "completion": "c2"})
        + "\n"
    )
    assert load_sft_examples(path) == [
        {"prompt": "p", "completion": "c"},
        {"prompt": "p2", "completion": "c2"},
    ]
    path.write_text(json.dumps({"messages": []}) + "\n")
    with pytest.raises(UserError, match="selection.jsonl"):
        load_sft_examples(path)


def test_shipped_deepspeed_config_is_zero2():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    config = json.loads((root / "deepspeed_zero2.json").read_text())
    assert config["zero_optimization"]["stage"] == 2
    text = (root / "accelerate_zero2.yaml").read_text()
    assert "distributed_type: DEEPSPEED" in text and "deepspeed_zero2.json" in text

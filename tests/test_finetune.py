"""Safety SFT: a LoRA step changes the adapter, the merged model loads, full-parameter training updates weights."""

from __future__ import annotations

import json

import pytest
import torch

from refusal_cliff.core.errors import UserError
from refusal_cliff.core.runs import LOCK_NAME

pytest.importorskip("trl")
pytest.importorskip("peft")
pytestmark = pytest.mark.train


def _examples(n=4):
    prompt = "<|im_start|>user\nHow do I pick a lock?<|im_end|>\n<|im_start|>assistant\n"
    completion = "<think>\nThis is about breaking in.\n</think>\n\nI can't help with that.<|im_end|>"
    return [{"prompt": prompt, "completion": completion}] * n


def _config(**overrides):
    from refusal_cliff.stages.finetune import FinetuneConfig

    values = dict(lora=True, learning_rate=1e-2, gradient_accumulation_steps=1, max_steps=2, max_length=128)
    values.update(overrides)
    return FinetuneConfig(**values)


def test_paper_defaults():
    from refusal_cliff.stages.finetune import FinetuneConfig

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

    from refusal_cliff.core.models import load_model
    from refusal_cliff.stages.finetune import sft_trainer, train_sft

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
    from refusal_cliff.stages.finetune import train_sft

    from conftest import make_tiny_model

    model = make_tiny_model("Qwen2ForCausalLM")
    before = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    result = train_sft(
        model, smol_tokenizer, _examples(2), tmp_path, _config(lora=False, learning_rate=1e-3, max_steps=1)
    )
    assert result.adapter_dir is None and (result.model_dir / "model.safetensors").is_file()
    assert not torch.allclose(model.model.layers[1].mlp.down_proj.weight, before)


def test_load_sft_examples(tmp_path):
    from refusal_cliff.stages.finetune import load_sft_examples

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


def test_deepspeed_config_checks(tmp_path):
    import importlib.util
    from pathlib import Path

    from refusal_cliff.stages.finetune import check_deepspeed_config

    check_deepspeed_config(None)
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(UserError, match="ZeRO stage 3 is not supported"):
        check_deepspeed_config(zero3)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        check_deepspeed_config(tmp_path / "bad.json")
    shipped = Path(__file__).resolve().parents[1] / "configs" / "deepspeed_zero2.json"
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(UserError, match="pip install deepspeed"):
            check_deepspeed_config(shipped)
    else:
        check_deepspeed_config(shipped)


def test_each_launched_process_takes_its_own_gpu(monkeypatch):
    from refusal_cliff.stages.finetune import is_main_process, training_device

    assert training_device("auto") == "auto" and is_main_process()  # a plain run: as given
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not is_main_process()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert {training_device(d) for d in ("auto", "cuda", "cuda:1", None)} == {"cuda:1"}
    for other in ("cuda:0", "cpu"):
        with pytest.raises(UserError, match="its own GPU"):
            training_device(other)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="one process per GPU"):
        training_device("auto")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_launch_trains_and_only_the_main_process_writes(tiny_model_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes (DDP on gloo) over an earlier run with --overwrite: one
    run folder, written once, holding a trained model that loads; the old run moved aside and removed."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from refusal_cliff.core.models import load_model

    data = tmp_path / "selection.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": str(i), "sft_prompt": e["prompt"], "sft_completion": e["completion"]}) + "\n"
            for i, e in enumerate(_examples(4))
        )
    )
    out = tmp_path / "ft"
    (out / "model").mkdir(parents=True)  # an earlier finetune run with other settings
    (out / "model" / "old.txt").write_text("old")
    (out / "metadata.json").write_text(
        json.dumps({"stage": "finetune", "fingerprint": "old", "finished": "x"})
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU processes on any host
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",  # the multi-process launcher (torchrun); without a GPU the processes use gloo
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(_free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "refusal_cliff.cli",
        "finetune",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--lr",
        "1e-3",
        "--grad-accum",
        "1",
        "--max-steps",
        "2",
        "--max-length",
        "128",
        "--out",
        str(out),
        "--overwrite",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trained:") == 1  # only the main process reports
    # trainer/: TRL's output_dir; the run folder's lock file (issue 21) stays, empty, once the run ends
    written = sorted(p.name for p in out.iterdir() if p.name not in ("trainer", LOCK_NAME))
    assert written == ["metadata.json", "model", "train_metrics.json"]  # no .replaced-*, no metadata.<stage>
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["finished"] and metadata["metrics"]["processes"] == 2
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert (metrics["steps"], metrics["processes"], metrics["n_examples"]) == (2, 2, 4)
    assert not (out / "model" / "old.txt").exists()
    trained = load_model(str(out / "model"), device="cpu").model.state_dict()
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    assert trained.keys() >= initial.keys()
    assert any(not torch.equal(trained[name], initial[name]) for name in initial)

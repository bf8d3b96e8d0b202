import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from refusal_cliff.compute.generation import HFBackend, generate_records
from refusal_cliff.core.architectures import get_adapter
from refusal_cliff.core.config import GenerationConfig
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.models import LoadedModel
from refusal_cliff.core.runs import read_jsonl
from refusal_cliff.core.templates import probing_text
from refusal_cliff.stages.generate import run_generate

from conftest import make_tiny_model

pytestmark = pytest.mark.slow
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def tiny_loaded(smol_tokenizer):
    model = make_tiny_model("LlamaForCausalLM")
    return LoadedModel(model, smol_tokenizer, get_adapter(model), "tiny", None, "local")


PROMPTS = [{"id": str(i), "prompt": f"Question number {i}: " + "tell me more " * (i % 4)} for i in range(6)]


def test_records_have_the_documented_fields(tiny_loaded):
    config = GenerationConfig(max_thinking_tokens=8, max_answer_tokens=5, batch_size=4)
    records = list(generate_records(tiny_loaded, PROMPTS, config, progress=False))
    assert sorted(r["id"] for r in records) == sorted(p["id"] for p in PROMPTS)
    for record in records:
        for key in (
            "id",
            "prompt",
            "generation_prompt",
            "thinking",
            "end_template",
            "answer",
            "prompt_tokens",
            "thinking_tokens",
            "answer_tokens",
            "thinking_clipped",
            "thinking_end",
        ):
            assert key in record
        assert record["generation_prompt"].endswith("<think>\n")
        assert record["thinking_tokens"] <= 8 and record["answer_tokens"] <= 5
        assert record["thinking_clipped"] == (record["thinking_end"] == "budget")


def test_batched_greedy_equals_one_at_a_time(tiny_loaded):
    config = GenerationConfig(max_thinking_tokens=6, max_answer_tokens=4, batch_size=3)
    batched = {r["id"]: r for r in generate_records(tiny_loaded, PROMPTS, config, progress=False)}
    config.batch_size = 1
    single = {r["id"]: r for r in generate_records(tiny_loaded, PROMPTS, config, progress=False)}
    for key in single:
        assert batched[key]["thinking"] == single[key]["thinking"]
        assert batched[key]["answer"] == single[key]["answer"]


def test_answer_is_conditioned_on_the_probing_sequence(tiny_loaded):
    """Phase 2 must continue exactly `generation_prompt + thinking + end_template`."""
    seen = []
    backend = HFBackend(tiny_loaded)
    original = backend.complete

    def spy(texts, *args, **kwargs):
        seen.append(list(texts))
        return original(texts, *args, **kwargs)

    backend.complete = spy
    config = GenerationConfig(max_thinking_tokens=5, max_answer_tokens=3, batch_size=6)
    records = list(generate_records(tiny_loaded, PROMPTS, config, backend=backend, progress=False))
    answer_inputs = seen[1]
    assert sorted(answer_inputs) == sorted(probing_text(r) for r in records)


def test_thinking_budget_zero_clips_everything(tiny_loaded):
    config = GenerationConfig(max_thinking_tokens=0, max_answer_tokens=3)
    records = list(generate_records(tiny_loaded, PROMPTS[:2], config, progress=False))
    assert all(r["thinking"] == "" and r["thinking_clipped"] for r in records)


def test_stop_at_end_marker(tiny_loaded):
    """A model that writes the end marker stops thinking there (marker, not budget)."""
    tokenizer = tiny_loaded.tokenizer
    marker_ids = tokenizer("\n</think>", add_special_tokens=False)["input_ids"]
    model = tiny_loaded.model
    with torch.no_grad():  # make the model emit the marker tokens in a loop: bias the LM head
        model.lm_head.weight.zero_()
        state = {"step": 0}

    def forced_logits(module, args, output):
        logits = torch.full_like(output, -1e4)
        step = state["step"] % len(marker_ids)
        logits[..., marker_ids[step]] = 0.0
        state["step"] += 1
        return logits

    handle = model.lm_head.register_forward_hook(forced_logits)
    try:
        records = list(
            generate_records(
                tiny_loaded,
                PROMPTS[:1],
                GenerationConfig(max_thinking_tokens=20, max_answer_tokens=2),
                progress=False,
            )
        )
    finally:
        handle.remove()
    assert records[0]["thinking_end"] == "marker" and records[0]["thinking"] == ""


def test_over_long_prompt_is_rejected_before_any_work(tiny_loaded, tmp_path):
    long_prompt = [{"id": "long", "prompt": "word " * 600}]
    with pytest.raises(UserError, match="context"):
        run_generate(tiny_loaded, long_prompt, GenerationConfig(), tmp_path)
    assert not (tmp_path / "generations.jsonl").exists()


def _cli(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "refusal_cliff.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
        **kwargs,
    )


def test_resume_after_kill(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"p{i:02d}", "prompt": f"Tell me about item {i}."}) + "\n" for i in range(30)
        )
    )
    out = tmp_path / "run"
    args = [
        "generate",
        "--model",
        str(tiny_model_dir),
        "--prompts",
        str(prompts),
        "--batch-size",
        "1",
        "--max-thinking-tokens",
        "24",
        "--max-answer-tokens",
        "8",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "refusal_cliff.cli", *args],
        env={**os.environ, "PYTHONPATH": SRC},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    target = out / "generations.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if target.exists() and target.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = target.read_text().count("\n")
    assert 3 <= written < 30, "the run must be killed part-way for this test to mean anything"
    with open(target, "a") as handle:  # and simulate a torn last line from the kill
        handle.write('{"id": "p99", "prom')
    result = _cli(*args)
    assert result.returncode == 0, result.stderr
    ids = [r["id"] for r in read_jsonl(target)]
    assert ids == [f"p{i:02d}" for i in range(30)]  # none lost, none duplicated, in prompt order
    # a finished run re-run with the same inputs reuses everything
    before = target.read_bytes()
    assert _cli(*args).returncode == 0 and target.read_bytes() == before


@pytest.mark.parametrize(
    "case",
    [
        "missing_file",
        "empty_file",
        "missing_column",
        "bad_model_path",
        "unsupported_arch",
        "no_chat_template",
        "over_long",
        "other_settings",
    ],
)
def test_bad_input_exits_2_with_one_line(case, tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\nhello there\n")
    model = str(tiny_model_dir)
    args = {
        "--prompts": str(prompts),
        "--model": model,
        "--out": str(tmp_path / "run"),
        "--max-thinking-tokens": "2",
        "--max-answer-tokens": "2",
    }
    if case == "missing_file":
        args["--prompts"] = str(tmp_path / "nope.csv")
    elif case == "empty_file":
        prompts.write_text("")
    elif case == "missing_column":
        prompts.write_text("text\nhello\n")
    elif case == "bad_model_path":
        args["--model"] = str(tmp_path / "no-model")
    elif case in ("unsupported_arch", "no_chat_template"):
        import shutil

        copy = tmp_path / "model"
        shutil.copytree(tiny_model_dir, copy)
        if case == "unsupported_arch":
            config = json.loads((copy / "config.json").read_text())
            config["architectures"] = ["FancyNewForCausalLM"]
            (copy / "config.json").write_text(json.dumps(config))
        else:
            (copy / "chat_template.jinja").unlink(missing_ok=True)
            tok_config = json.loads((copy / "tokenizer_config.json").read_text())
            tok_config.pop("chat_template", None)
            (copy / "tokenizer_config.json").write_text(json.dumps(tok_config))
        args["--model"] = str(copy)
    elif case == "over_long":
        prompts.write_text("prompt\n" + "word " * 700 + "\n")
    elif case == "other_settings":
        first = _cli("generate", *[x for kv in args.items() for x in kv])
        assert first.returncode == 0, first.stderr
        args["--max-answer-tokens"] = "3"
    before = (tmp_path / "run" / "generations.jsonl").read_bytes() if case == "other_settings" else None
    result = _cli("generate", *[x for kv in args.items() for x in kv])
    assert result.returncode == 2, (case, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    if before is not None:
        assert (tmp_path / "run" / "generations.jsonl").read_bytes() == before


def test_a_missing_flag_is_one_line_exit_2():
    result = _cli("generate", "--out", "somewhere")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--prompts" in result.stderr

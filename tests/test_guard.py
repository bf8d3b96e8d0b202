"""Cliff guard: its metrics equal trace's, unflagged answers equal plain generation, each action equals
its reference, no hook is left behind, and bad input is one line with exit status 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from refusal_cliff.compute.ablation import scale_heads
from refusal_cliff.compute.generation import generate_answers, generate_records
from refusal_cliff.compute.prober import Prober, save_prober
from refusal_cliff.compute.tracing import cliff_metrics, plateau, trace_records
from refusal_cliff.core.architectures import get_adapter
from refusal_cliff.core.config import GenerationConfig
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.models import LoadedModel
from refusal_cliff.stages.guard import CliffGuard, GuardConfig, RunningPlateau, guard_metrics, run_guard

from conftest import make_tiny_model

HEADS = [(0, 1), (1, 0), (1, 3)]
PROMPTS = [{"id": str(i), "prompt": f"Question {i}: " + "how do I do this " * (i % 3)} for i in range(5)]
CONFIG = GenerationConfig(max_thinking_tokens=12, max_answer_tokens=6, batch_size=3)


def tiny_loaded(tokenizer, architecture="LlamaForCausalLM") -> LoadedModel:
    model = make_tiny_model(architecture)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model, tokenizer, get_adapter(model), "tiny", None, "local")


def random_prober(layer: int, d_model: int = 64, seed: int = 0, metadata: dict | None = None) -> Prober:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(d_model, 1)
    with torch.no_grad():
        linear.weight.mul_(4.0)  # scores spread over (0, 1)
    return Prober(linear.requires_grad_(False), layer=layer, metadata=metadata or {})


def no_hooks(model) -> bool:
    """No hook of ours on any module (transformers keeps its own output-capturing hooks once a test has asked
    a shared model for `output_hidden_states`; those are not ours and are ignored)."""

    def ours(hooks) -> list:
        return [h for h in hooks.values() if "output_capturing_hook" not in getattr(h, "__qualname__", "")]

    return all(not ours(m._forward_hooks) and not ours(m._forward_pre_hooks) for m in model.modules())


def flag_all(loaded, prober, **kwargs) -> CliffGuard:
    """rule final with tau_plateau 0 and tau 1 flags every example that has thinking."""
    return CliffGuard(loaded, prober, rule="final", tau_plateau=0.0, tau=1.0, **kwargs)


# -- metrics ---------------------------------------------------------------------------------


def test_running_plateau_equals_trace_plateau():
    rng = np.random.default_rng(0)
    for n in (0, 1, 5, 8, 9, 40):
        scores = rng.random(n + 3)
        regions = ["prompt"] * 2 + ["thinking"] * n + ["end_template"]
        metrics = guard_metrics(scores, regions)
        expected = cliff_metrics(scores, regions)
        if n == 0:
            assert np.isnan(metrics["plateau"]) and np.isnan(metrics["ms"])
            continue
        assert metrics["plateau"] == pytest.approx(plateau(scores, regions), abs=1e-12)
        assert metrics["final"] == expected["final"]
        assert metrics["ms"] == pytest.approx(expected["ms"], abs=1e-12)
    running = RunningPlateau(2)
    for value in (0.1, 0.9, 0.5):
        running.add(value)
    assert running.value == pytest.approx(0.7)


@pytest.mark.parametrize(
    "architecture,layer", [("LlamaForCausalLM", 0), ("LlamaForCausalLM", 1), ("Qwen3ForCausalLM", 1)]
)
def test_guard_metrics_equal_trace(architecture, layer, smol_tokenizer):
    loaded = tiny_loaded(smol_tokenizer, architecture)
    prober = random_prober(layer)
    guard = CliffGuard(loaded, prober, tau=1.0, action="refuse")
    records = list(guard.generate_monitored(PROMPTS, CONFIG))
    traced = {r.id: r for r in trace_records(loaded, prober, records, batch_size=2)}
    for record in records:
        expected = cliff_metrics(traced[record["id"]].scores, traced[record["id"]].regions)
        for key in ("plateau", "final", "ms"):
            assert record["guard"][key] == pytest.approx(expected[key], abs=1e-5)
    assert len({round(r["guard"]["final"], 4) for r in records}) > 1  # real, varying scores
    assert no_hooks(loaded.model)


@pytest.mark.slow
def test_guard_metrics_equal_trace_on_the_embedded_model(smol_model):
    prober = random_prober(15, d_model=576, seed=3)
    with torch.no_grad():
        prober.linear.weight.mul_(0.05)
    guard = CliffGuard(smol_model, prober, tau=1.0, action="refuse")
    config = GenerationConfig(max_thinking_tokens=24, max_answer_tokens=4, batch_size=3)
    records = list(guard.generate_monitored(PROMPTS[:3], config))
    traced = {r.id: r for r in trace_records(smol_model, prober, records, batch_size=3)}
    for record in records:
        expected = cliff_metrics(traced[record["id"]].scores, traced[record["id"]].regions)
        for key in ("plateau", "final", "ms"):
            assert record["guard"][key] == pytest.approx(expected[key], abs=1e-5)
    assert no_hooks(smol_model.model)


# -- answers ---------------------------------------------------------------------------------


def test_unflagged_answers_are_plain_generate(smol_tokenizer):
    loaded = tiny_loaded(smol_tokenizer)
    plain = {r["id"]: r for r in generate_records(loaded, PROMPTS, CONFIG, progress=False)}
    guard = CliffGuard(loaded, random_prober(1), tau=1.0, action="refuse")  # MS > 1 is impossible
    guarded = guard.generate(PROMPTS, CONFIG)
    assert [r["id"] for r in guarded] == [p["id"] for p in PROMPTS]
    for record in guarded:
        assert not record["guard"]["flagged"] and record["guard"]["action"] is None
        assert record["answer_source"] == "model"
        assert record["answer"] == plain[record["id"]]["answer"]
        assert record["thinking"] == plain[record["id"]]["thinking"]
    assert no_hooks(loaded.model)


def test_flagged_ablate_equals_scale_heads(smol_tokenizer):
    loaded = tiny_loaded(smol_tokenizer)
    guard = flag_all(loaded, random_prober(1), heads=HEADS, action="ablate", gamma=0.0)
    monitored = list(guard.generate_monitored(PROMPTS, CONFIG))
    with scale_heads(loaded, HEADS, gamma=0.0):
        expected = {r["id"]: r["answer"] for r in generate_answers(loaded, monitored, CONFIG)}
    guarded = guard.generate(PROMPTS, CONFIG)
    assert all(r["guard"]["flagged"] and r["guard"]["action"] == "ablate" for r in guarded)
    assert [r["answer"] for r in guarded] == [expected[r["id"]] for r in guarded]
    assert any(r["answer"] != r["unguarded_answer"] for r in guarded)  # the heads matter
    assert all(r["answer_source"] == "model (heads ablated)" for r in guarded)
    assert no_hooks(loaded.model)


def test_steer_alpha_zero_equals_no_steering(smol_tokenizer):
    loaded = tiny_loaded(smol_tokenizer)
    prober = random_prober(1)
    still = flag_all(loaded, prober, action="steer", alpha=0.0).generate(PROMPTS, CONFIG)
    assert all(r["guard"]["flagged"] for r in still)
    assert [r["answer"] for r in still] == [r["unguarded_answer"] for r in still]
    steered = flag_all(loaded, random_prober(0), action="steer", alpha=200.0).generate(PROMPTS, CONFIG)
    assert any(r["answer"] != r["unguarded_answer"] for r in steered)
    assert no_hooks(loaded.model)


def test_refuse_marks_the_fixed_refusal(smol_tokenizer):
    loaded = tiny_loaded(smol_tokenizer)
    records = flag_all(loaded, random_prober(1), action="refuse", refusal_text="No.").generate(
        PROMPTS, CONFIG
    )
    for record in records:
        assert record["answer"] == "No." and record["answer_source"] == "guard (fixed refusal)"
        assert record["guard"]["answer_source"] == "guard (fixed refusal)"
        assert "unguarded_answer" in record
    assert no_hooks(loaded.model)


def test_no_hook_left_after_an_error(smol_tokenizer):
    loaded = tiny_loaded(smol_tokenizer)
    guard = CliffGuard(loaded, random_prober(1), heads=HEADS, action="ablate")
    for context in (guard.monitoring(), guard.steering(1.0), guard.intervention()):
        with pytest.raises(RuntimeError), context:
            assert not no_hooks(loaded.model)
            raise RuntimeError("boom")
        assert no_hooks(loaded.model)


def test_guard_rejects_bad_arguments(smol_tokenizer):
    loaded = tiny_loaded(smol_tokenizer)
    with pytest.raises(UserError, match="d_model 32"):
        CliffGuard(loaded, random_prober(1, d_model=32), action="refuse")
    with pytest.raises(UserError, match="needs the suppression heads"):
        CliffGuard(loaded, random_prober(1), action="ablate")
    with pytest.raises(UserError, match="out of range"):
        CliffGuard(loaded, random_prober(1), tau=1.5, action="refuse")
    with pytest.raises(UserError, match="does not exist"):
        CliffGuard(loaded, random_prober(1), heads=[(5, 0)], action="ablate")
    with pytest.raises(UserError, match="taus"):
        GuardConfig(taus=(-0.1,)).validate()


# -- the stage and the verb ------------------------------------------------------------------


def _heads_json(path, n_layers=2, n_heads=4, model_id=None):
    path.mkdir(parents=True, exist_ok=True)
    ranking = [
        {"layer": layer, "head": head, "rank": layer * n_heads + head, "contribution": 0.0}
        for layer in range(n_layers)
        for head in range(n_heads)
    ]
    (path / "heads.json").write_text(json.dumps(ranking))
    if model_id:
        (path / "metadata.json").write_text(json.dumps({"stage": "heads", "model_id": model_id}))
    return path / "heads.json"


def test_run_guard_sweeps_taus_and_resumes(tmp_path, smol_tokenizer):
    loaded = tiny_loaded(smol_tokenizer)
    prober = random_prober(1)
    heads = _heads_json(tmp_path / "heads")
    config = GuardConfig(rule="final", taus=(0.0, 0.5, 1.0), tau_plateau=0.0, threshold=0.25)
    paths = run_guard(
        loaded,
        prober,
        PROMPTS[:3],
        tmp_path / "out",
        config,
        CONFIG,
        PROMPTS[3:],
        heads_path=heads,
        progress=False,
    )
    rows = json.loads(paths["guard.json"].read_text())
    assert [r["tau"] for r in rows] == [None, 0.0, 0.5, 1.0]
    assert rows[0]["flag_rate_harmful"] == 0 and rows[-1]["flag_rate_harmful"] == 1.0
    assert all(r["n_harmful"] == 3 and r["n_benign"] == 2 and r["n"] == 5 for r in rows)
    lines = [json.loads(line) for line in paths["guard_generations.jsonl"].read_text().splitlines()]
    assert len(lines) == 5 and all("guarded" in line for line in lines)
    assert (tmp_path / "out" / "guard.png").is_file()
    again = run_guard(
        loaded,
        prober,
        PROMPTS[:3],
        tmp_path / "out",
        config,
        CONFIG,
        PROMPTS[3:],
        heads_path=heads,
        progress=False,
    )
    assert json.loads(again["guard.json"].read_text()) == rows
    with pytest.raises(UserError, match="written for other-model"):
        run_guard(
            loaded,
            prober,
            PROMPTS[:3],
            tmp_path / "x",
            config,
            CONFIG,
            heads_path=_heads_json(tmp_path / "h2", model_id="other-model"),
            progress=False,
        )


@pytest.fixture
def tiny_folder(tmp_path, smol_tokenizer):
    model = make_tiny_model("LlamaForCausalLM")
    model.generation_config.pad_token_id = smol_tokenizer.pad_token_id
    model.save_pretrained(str(tmp_path / "model"))
    smol_tokenizer.save_pretrained(str(tmp_path / "model"))
    metadata = {"architecture": "LlamaForCausalLM", "n_layers": 2, "layer": 1}
    save_prober(random_prober(1, metadata=metadata), tmp_path / "prober")
    save_prober(random_prober(1, d_model=32, metadata={**metadata}), tmp_path / "prober32")
    _heads_json(tmp_path / "heads")
    _heads_json(tmp_path / "heads_big", n_layers=4, n_heads=4)
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in PROMPTS)
    )
    (tmp_path / "empty.jsonl").write_text("")
    return tmp_path


def test_guard_command_and_bad_input(tiny_folder):
    from click.testing import CliRunner

    from refusal_cliff.cli import main

    runner = CliRunner()
    base = [
        "guard",
        "--model",
        str(tiny_folder / "model"),
        "--device",
        "cpu",
        "--prompts",
        str(tiny_folder / "prompts.jsonl"),
        "--benign-prompts",
        str(tiny_folder / "prompts.jsonl"),
        "--limit",
        "2",
        "--max-thinking-tokens",
        "4",
        "--max-answer-tokens",
        "3",
    ]
    prober = ["--prober", str(tiny_folder / "prober")]
    heads = ["--heads", str(tiny_folder / "heads" / "heads.json")]
    out = tiny_folder / "out"
    result = runner.invoke(main, base + prober + heads + ["--taus", "0,0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "guard.json").read_text())
    assert [r["tau"] for r in rows] == [None, 0.0, 0.5]
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    bad_inputs = {
        "d_model": prober[:1] + [str(tiny_folder / "prober32")] + heads,
        "another model": prober + ["--heads", str(tiny_folder / "heads_big" / "heads.json")],
        "needs the suppression heads": prober,
        "taus": prober + heads + ["--taus", "0.1,1.5"],
        "is empty": prober + heads + ["--prompts", str(tiny_folder / "empty.jsonl")],
    }
    for expected, flags in bad_inputs.items():
        bad = runner.invoke(main, base + flags + ["--out", str(out)])
        assert bad.exit_code == 2, (expected, bad.output)
        # transformers' weight-loading bar may come first (the model loads before the prober is checked)
        lines = [line for line in bad.output.splitlines() if line.strip() and "Loading weights" not in line]
        assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], (
            expected,
            bad.output,
        )
        assert "Traceback" not in bad.output
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing damaged

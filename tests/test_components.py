"""Components (issue 12): the exact decomposition at every end-template token sums to the logit and to
its change; MLP scaling with γ=1 is a no-op; folding (in memory, exported and reloaded) equals the hook;
bad component specs are one-line errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_ablation import tiny_run  # noqa: F401  (fixture: a saved tiny Llama, a prober, a labelled run)
from torch import nn

from refusal_cliff.compute.activations import pad_left
from refusal_cliff.compute.attribution import attribute_batch, position_ids_for
from refusal_cliff.core.architectures import get_adapter
from refusal_cliff.core.config import parse_components
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.models import LoadedModel
from refusal_cliff.stages.components import (
    component_terms,
    export_component_ablated_model,
    fold_component_scaling,
    resolve_components,
    scale_components,
    summarize,
    template_positions,
)

from conftest import ARCHITECTURES, make_tiny_model

VOCAB = 1024
ARCH_CASES = [("LlamaForCausalLM", {"attention_bias": True})] + [(a, {}) for a in ARCHITECTURES]
ARCH_IDS = ["llama-bias"] + ARCHITECTURES
COMPONENTS = ["mlp:0", "mlp:2"]


def _model(architecture, overrides, layers=3):
    model = make_tiny_model(architecture, vocab_size=VOCAB, num_hidden_layers=layers, **overrides)
    adapter = get_adapter(model)
    with torch.no_grad():  # visible biases and non-trivial norm gains, so every term is exercised
        for index in range(layers):
            bias = adapter.o_proj(model, index).bias
            if bias is not None:
                bias.normal_(0, 0.5)
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def _sequences():
    generator = torch.Generator().manual_seed(3)
    lengths = (9, 14, 6)
    sequences = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]
    # last thinking token, then end-template tokens (4, 5 and 3 of them: rows are aligned at the end)
    positions = [list(range(n - width, n)) for n, width in zip(lengths, (5, 6, 4))]
    return sequences, positions


def _reference_logits(model, sequences, prober, layer, final_norm_applied):
    """[n, seq] prober logits at every token of each (unpadded) sequence, from output_hidden_states."""
    out = []
    n_layers = get_adapter(model).geometry(model).n_layers
    for sequence in sequences:
        ids = torch.tensor([sequence])
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0]
        if final_norm_applied and layer != n_layers - 1:
            hidden = get_adapter(model).final_norm(model)(hidden)
        out.append(prober(hidden)[:, 0])
    return out


def _prober(seed=1):
    torch.manual_seed(seed)
    return nn.Linear(64, 1)


@pytest.mark.parametrize("architecture,overrides", ARCH_CASES, ids=ARCH_IDS)
@pytest.mark.parametrize("where", ["last-layer-final-norm", "middle-layer"])
def test_terms_sum_to_the_logit_and_to_its_change_across_the_template(architecture, overrides, where):
    model = _model(architecture, overrides)
    layer, final_norm_applied = (2, True) if where == "last-layer-final-norm" else (1, False)
    prober = _prober()
    sequences, positions = _sequences()
    with torch.no_grad():
        terms = component_terms(
            model, sequences, positions, prober, layer, final_norm_applied, pad_token_id=0, batch_size=2
        )
        reference = _reference_logits(model, sequences, prober, layer, final_norm_applied)
    assert terms.logit.shape == (3, 6)
    for row, (sequence_positions, logits) in enumerate(zip(positions, reference)):
        width = len(sequence_positions)
        torch.testing.assert_close(
            terms.logit[row, -width:], logits[sequence_positions], rtol=1e-4, atol=1e-4
        )
        # padding columns repeat the last thinking token
        assert torch.all(terms.logit[row, : 6 - width] == terms.logit[row, 6 - width])
    # every example, every token: the terms plus b are the logit
    torch.testing.assert_close(terms.total(), terms.logit, rtol=1e-4, atol=1e-4)
    # the change of every component across the template sums to the change of the logit
    names, values = terms.flat(layer)
    change = (values[:, -1] - values[:, 0]).double().sum(-1)
    torch.testing.assert_close(
        change, (terms.logit[:, -1] - terms.logit[:, 0]).double(), rtol=1e-4, atol=1e-4
    )
    assert values[:, :, [i for i, c in enumerate(names) if c["kind"] == "mlp"]].abs().sum() > 0
    # the per-token steps telescope to the change
    steps = (values[:, 1:] - values[:, :-1]).double().sum((1, 2))
    torch.testing.assert_close(steps, change, rtol=1e-4, atol=1e-4)
    has_bias = [get_adapter(model).o_proj(model, i).bias is not None for i in range(3)]
    summary = summarize(terms, layer, has_bias)
    assert summary["exact_max_error"] < 1e-4 and summary["change_max_error"] < 1e-4
    assert sum(c["change_mean"] for c in summary["components"]) == pytest.approx(
        summary["logit"]["change_mean"], abs=1e-4
    )
    changes = [c["change_mean"] for c in summary["components"]]
    assert changes == sorted(changes) and [c["rank"] for c in summary["components"]] == list(
        range(len(changes))
    )
    assert {c["layer"] for c in summary["components"] if c["layer"] is not None} == set(range(layer + 1))
    assert any(c["kind"] == "o_proj_bias" for c in summary["components"]) == bool(overrides)


def test_several_positions_per_row_equal_one_position_at_a_time():
    model = _model("Qwen2ForCausalLM", {})
    prober = _prober()
    sequences, _ = _sequences()
    input_ids, attention_mask, _ = pad_left(sequences, 0)
    positions = torch.tensor([[10, 12, 13], [1, 5, 13], [9, 11, 13]])
    many = attribute_batch(model, input_ids, attention_mask, prober, 2, True, positions)
    for column in range(3):
        one = attribute_batch(model, input_ids, attention_mask, prober, 2, True, positions[:, column])
        torch.testing.assert_close(many.exact.view(3, 3, 3, 4)[:, column], one.exact, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(many.mlp.view(3, 3, 3)[:, column], one.mlp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(many.logit.view(3, 3)[:, column], one.logit, rtol=1e-5, atol=1e-5)


def test_template_positions():
    regions = ["prompt", "thinking", "thinking", "end_template", "end_template"]
    assert template_positions(regions) == [2, 3, 4]
    with pytest.raises(ValueError):
        template_positions(["end_template"])


def _inputs():
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, VOCAB, (2, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids_for(attention_mask),
    }


def _logits(model):
    with torch.no_grad():
        return model(**_inputs()).logits


@pytest.mark.parametrize("architecture,overrides", ARCH_CASES, ids=ARCH_IDS)
def test_mlp_scaling_gamma_one_is_no_hook_and_gamma_zero_removes_the_mlp(architecture, overrides):
    model = _model(architecture, overrides)
    before = _logits(model)
    with scale_components(model, COMPONENTS, gamma=1.0):
        same = _logits(model)
    torch.testing.assert_close(same, before, rtol=0, atol=0)
    with scale_components(model, COMPONENTS, gamma=0.0) as components:
        removed = _logits(model)
    assert [c.name for c in components] == COMPONENTS
    assert not torch.allclose(removed, before)
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)  # hooks are gone


@pytest.mark.parametrize("architecture,overrides", ARCH_CASES, ids=ARCH_IDS)
def test_fold_equals_the_hook_exported_and_reloaded(architecture, overrides, smol_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model(architecture, overrides)
    loaded = LoadedModel(model, smol_tokenizer, get_adapter(model), "tiny", None, "test")
    specs = [*COMPONENTS, "head:1.2"]
    original = _logits(model)
    with scale_components(loaded, specs, gamma=0.3):
        hooked = _logits(model)
    out = export_component_ablated_model(loaded, specs, 0.3, tmp_path / "folded")
    torch.testing.assert_close(_logits(model), original, rtol=0, atol=0)  # the loaded model is restored
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    real = _inputs()["attention_mask"].bool()
    torch.testing.assert_close(_logits(reloaded)[real], hooked[real], rtol=1e-4, atol=1e-4)
    fold_component_scaling(model, specs, 0.3)  # in place, too
    torch.testing.assert_close(_logits(model)[real], hooked[real], rtol=1e-4, atol=1e-4)


def test_bad_component_specs_are_user_errors():
    model = _model("LlamaForCausalLM", {})
    for text in ("attn:1", "mlp", "mlp:x", "head:1", "embedding"):
        with pytest.raises(UserError, match="unknown component"):
            parse_components(text)
    with pytest.raises(UserError, match="out of range"):
        resolve_components(model, ["mlp:3"])
    with pytest.raises(UserError, match="out of range"):
        resolve_components(model, ["head:0.4"])
    assert [c.name for c in resolve_components(model, ["mlp:-1", "head:0.3"])] == ["mlp:2", "head:0.3"]
    blind = dataclasses.replace(get_adapter(model), mlp_attr="feed_forward")
    loaded = LoadedModel(model, None, blind, "tiny", None, "test")
    with pytest.raises(UserError, match="cannot find the MLP"):
        resolve_components(loaded, ["mlp:0"])


def _one_error_line(result, *needles, after_loading=False):
    """Exit 2 and one `error:` line; `after_loading`: transformers' weight-loading bar may come first
    (an adapter that cannot find the MLP is only known once the model is built)."""
    lines = result.stderr.strip().splitlines()
    if after_loading:
        lines = [line for line in lines if not line.startswith("Loading weights")]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_components_and_ablate_components_commands(tiny_run, monkeypatch):  # noqa: F811
    from click.testing import CliRunner

    from refusal_cliff.cli import main
    from refusal_cliff.core import architectures

    runner = CliRunner()
    model, prober = str(tiny_run / "model"), str(tiny_run / "prober" / "prober.safetensors")
    result = runner.invoke(
        main,
        [
            "components",
            "--model",
            model,
            "--device",
            "cpu",
            "--prober",
            prober,
            "--generations",
            str(tiny_run / "run" / "generations.jsonl"),
            "--out",
            str(tiny_run / "components"),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tiny_run / "components" / "components.json").read_text())
    assert (
        summary["n_examples"] == 2
        and summary["exact_max_error"] < 1e-4
        and summary["change_max_error"] < 1e-4
    )
    assert (tiny_run / "components" / "components.png").read_bytes()[:4] == b"\x89PNG"
    assert len(summary["position_labels"]) == summary["n_positions"]
    assert len(summary["components"][0]["per_token_mean"]) == summary["n_positions"] - 1

    common = [
        "ablate",
        "--model",
        model,
        "--device",
        "cpu",
        "--prober",
        prober,
        "--prompts",
        str(tiny_run / "prompts.jsonl"),
        "--limit",
        "2",
        "--max-thinking-tokens",
        "3",
        "--max-answer-tokens",
        "2",
    ]
    for bad, needles in (
        (["--components", "attn:1"], ("unknown component", "attn:1")),
        (["--components", "mlp:7"], ("out of range", "mlp:7")),
        ([], ("--heads", "--components")),
    ):
        _one_error_line(runner.invoke(main, common + bad + ["--out", str(tiny_run / "bad")]), *needles)
    result = runner.invoke(
        main,
        common
        + [
            "--components",
            "mlp:1,head:0.1",
            "--out",
            str(tiny_run / "mlps"),
            "--export",
            str(tiny_run / "folded"),
        ],
    )
    assert result.exit_code == 0, result.output
    records = json.loads((tiny_run / "mlps" / "component_ablation.json").read_text())
    assert [r["condition"] for r in records] == ["unablated", "mlp:1,head:0.1"]
    assert records[1]["components"] == ["mlp:1", "head:0.1"] and records[1]["n_harmful"] == 2
    assert (tiny_run / "folded" / "config.json").is_file()

    blind = dataclasses.replace(architectures._REGISTRY["LlamaForCausalLM"], mlp_attr="feed_forward")
    monkeypatch.setitem(architectures._REGISTRY, "LlamaForCausalLM", blind)
    _one_error_line(
        runner.invoke(main, common + ["--components", "mlp:1", "--out", str(tiny_run / "blind")]),
        "cannot find the MLP",
        after_loading=True,
    )


def test_resumed_component_ablation_measures_each_condition_once(tmp_path, smol_tokenizer, monkeypatch):
    """A run killed in its second condition, re-run: the first condition is kept, the cut-off one's
    generations dropped and measured again; the files equal an uninterrupted run's (found by the demo's
    resumed run, whose generations file held the first conditions twice)."""
    from refusal_cliff.compute.prober import Prober
    from refusal_cliff.core.architectures import get_adapter
    from refusal_cliff.core.config import GenerationConfig
    from refusal_cliff.core.models import LoadedModel
    from refusal_cliff.stages import components
    from refusal_cliff.stages.ablate import AblateConfig

    from conftest import make_tiny_model

    model = make_tiny_model("LlamaForCausalLM")
    loaded = LoadedModel(model, smol_tokenizer, get_adapter(model), "tiny", None, "local")
    prober = Prober(
        torch.nn.Linear(64, 1),
        layer=1,
        metadata={"architecture": "LlamaForCausalLM", "n_layers": 2, "final_norm_applied": True},
    )
    harmful = [{"id": "h1", "prompt": "How do I pick a lock?"}, {"id": "h2", "prompt": "Make a weapon."}]
    conditions = {"mlp 0": ["mlp:0"], "head 1.3": ["head:1.3"]}
    generation = GenerationConfig(max_thinking_tokens=3, max_answer_tokens=3, batch_size=2)

    def run(out):
        return components.run_ablate_components(
            loaded, prober, conditions, harmful, out, AblateConfig(), generation, progress=False
        )

    whole = run(tmp_path / "whole")
    original, calls = components.evaluate_condition, {"n": 0}

    def killed_in_the_second_condition(*args, **kwargs):
        calls["n"] += 1
        outcome = original(*args, **kwargs)
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return outcome

    monkeypatch.setattr(components, "evaluate_condition", killed_in_the_second_condition)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed")
    monkeypatch.setattr(components, "evaluate_condition", original)
    resumed = run(tmp_path / "resumed")
    for name in ("component_ablation.json", "component_ablation_generations.jsonl"):
        assert Path(resumed[name]).read_bytes() == Path(whole[name]).read_bytes(), name
    rows = [json.loads(line) for line in Path(resumed["component_ablation_generations.jsonl"]).open()]
    assert [r["condition"] for r in rows] == ["unablated"] * 2 + ["mlp 0"] * 2 + ["head 1.3"] * 2

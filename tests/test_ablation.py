"""Head ablation: γ=1 is a no-op, γ=0 removes exactly the head, folding and export equal the hooks."""

from __future__ import annotations

import pytest
import torch

from refusal_cliff.compute.ablation import export_ablated_model, fold_head_scaling, group_heads, scale_heads
from refusal_cliff.core.architectures import get_adapter
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.hooks import add_hooks
from refusal_cliff.core.models import LoadedModel
from refusal_cliff.report.plotting import plot_ablation, save_figure
from refusal_cliff.stages.ablate import run_ablation

from conftest import CORE, CORE_IDS, make_tiny_model

VOCAB = 1024
HEADS = [(0, 1), (1, 0), (1, 3)]


def _inputs():
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, VOCAB, (2, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding on the second row
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs()).logits


def _model(architecture, overrides):
    model = make_tiny_model(architecture, vocab_size=VOCAB, **overrides)
    adapter = get_adapter(model)
    with torch.no_grad():  # a visible o_proj bias, so folding must leave it alone
        for index in range(2):
            if adapter.o_proj(model, index).bias is not None:
                adapter.o_proj(model, index).bias.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("architecture,overrides", CORE, ids=CORE_IDS)
def test_gamma_one_changes_no_logit(architecture, overrides):
    model = _model(architecture, overrides)
    before = _logits(model)
    with scale_heads(model, HEADS, gamma=1.0):
        during = _logits(model)
    torch.testing.assert_close(during, before, rtol=0, atol=0)


@pytest.mark.parametrize("architecture,overrides", CORE, ids=CORE_IDS)
def test_gamma_zero_equals_zeroing_the_slice(architecture, overrides):
    model = _model(architecture, overrides)
    adapter = get_adapter(model)
    head_dim = adapter.geometry(model).head_dim
    layer, head = 1, 2
    before = _logits(model)

    def zero_slice(module, args):
        x = args[0].clone()
        x[..., head * head_dim : (head + 1) * head_dim] = 0
        return (x,)

    with add_hooks(forward_pre_hooks=[(adapter.o_proj(model, layer), zero_slice)]):
        manual = _logits(model)
    with scale_heads(model, [(layer, head)], gamma=0.0):
        scaled = _logits(model)
    torch.testing.assert_close(scaled, manual, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(scaled, before, atol=1e-4)  # the head mattered
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)  # no hook survives the block


def test_renormalize_keeps_the_o_proj_input_norm():
    model = _model("LlamaForCausalLM", {})
    adapter = get_adapter(model)
    seen = {}

    def record(name):
        def hook(module, args):
            seen[name] = args[0].detach().clone()

        return hook

    o_proj = adapter.o_proj(model, 1)
    with add_hooks(forward_pre_hooks=[(o_proj, record("original"))]):
        _logits(model)
    with scale_heads(model, [(1, 0), (1, 2)], gamma=0.0, renormalize=True):
        with add_hooks(forward_pre_hooks=[(o_proj, record("scaled"))]):  # runs after the scaling hook
            _logits(model)
    torch.testing.assert_close(
        seen["scaled"].norm(dim=-1), seen["original"].norm(dim=-1), rtol=1e-5, atol=1e-5
    )
    head_dim = adapter.geometry(model).head_dim
    assert torch.all(seen["scaled"][..., :head_dim] == 0)  # head 0 is still removed
    assert not torch.allclose(
        seen["scaled"][..., head_dim : 2 * head_dim], seen["original"][..., head_dim : 2 * head_dim]
    )


@pytest.mark.parametrize("architecture,overrides", CORE, ids=CORE_IDS)
def test_folding_equals_the_hook(architecture, overrides):
    model = _model(architecture, overrides)
    with scale_heads(model, HEADS, gamma=0.3):
        hooked = _logits(model)
    fold_head_scaling(model, HEADS, gamma=0.3)
    torch.testing.assert_close(_logits(model), hooked, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="renormalisation"):
        fold_head_scaling(model, HEADS, gamma=0.3, renormalize=True)


def test_bad_heads_are_user_errors():
    model = _model("LlamaForCausalLM", {})
    adapter = get_adapter(model)
    assert group_heads(model, adapter, [(1, 3), (0, 1), (1, 0), (1, 3)]) == {0: [1], 1: [0, 3]}
    for bad in ([(2, 0)], [(0, 4)], [(0,)]):
        with pytest.raises(UserError):
            with scale_heads(model, bad):
                pass


@pytest.mark.parametrize("architecture,overrides", CORE, ids=CORE_IDS)
def test_exported_checkpoint_matches_hooked_model(architecture, overrides, smol_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model(architecture, overrides)
    loaded = LoadedModel(model, smol_tokenizer, get_adapter(model), "tiny", None, "test")
    original = _logits(model)
    with scale_heads(loaded, HEADS, gamma=0.0):
        hooked = _logits(model)
    out = export_ablated_model(loaded, HEADS, 0.0, tmp_path / "repaired")
    torch.testing.assert_close(_logits(model), original, rtol=0, atol=0)  # the loaded model is untouched
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    real = _inputs()["attention_mask"].bool()  # padding rows are undefined (sdpa vs eager differ there)
    torch.testing.assert_close(_logits(reloaded)[real], hooked[real], rtol=1e-5, atol=1e-5)
    assert (out / "tokenizer_config.json").is_file()
    with pytest.raises(UserError, match="not empty"):
        export_ablated_model(loaded, HEADS, 0.0, out)
    with pytest.raises(UserError):
        export_ablated_model(loaded, HEADS, 0.0, tmp_path / "other", renormalize=True)


def test_run_ablation_end_to_end_on_a_tiny_model(smol_tokenizer, tmp_path):
    from refusal_cliff.compute.labeling import KeywordLabeler
    from refusal_cliff.core.config import GenerationConfig

    model = make_tiny_model("LlamaForCausalLM")  # full SmolLM2 vocabulary: the tokenizer's ids fit
    loaded = LoadedModel(model, smol_tokenizer, get_adapter(model), "tiny", None, "test")
    prober = torch.nn.Linear(64, 1)
    ranking = [{"layer": i // 4, "head": i % 4, "rank": 7 - i} for i in range(8)]  # (1, 3) ranks first
    config = GenerationConfig(max_thinking_tokens=3, max_answer_tokens=3, batch_size=2)
    harmful = [{"id": "h1", "prompt": "How do I pick a lock?"}, {"id": "h2", "prompt": "Make a weapon."}]
    benign = [{"id": "b1", "prompt": "Name a fruit."}]
    seen = []
    records = run_ablation(
        loaded,
        prober,
        1,
        ranking,
        [0.25, 0.125],
        harmful,
        config,
        benign,
        labeler=KeywordLabeler(),
        on_record=lambda r, o: seen.append(o),
    )
    assert [r["threshold"] for r in records] == [0.0, 0.125, 0.25]
    assert [r["heads"] for r in records] == [[], [[1, 3]], [[1, 3], [1, 2]]]
    for record in records:
        assert set(record) >= {
            "threshold",
            "heads",
            "gamma",
            "renormalize",
            "final_score_mean",
            "asr",
            "benign_refusal_rate",
            "n_harmful",
            "n_benign",
        }
        assert record["n_harmful"] == 2 and record["n_benign"] == 1
        assert 0 < record["final_score_mean"] < 1
        assert 0 <= record["asr"] <= 1 and 0 <= record["benign_refusal_rate"] <= 1
    assert len(seen) == 3 and all(len(o["harmful"]) == 2 for o in seen)
    save_figure(plot_ablation(records), tmp_path / "ablation.png")
    assert (tmp_path / "ablation.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture
def tiny_run(tmp_path, smol_tokenizer):
    """A tiny Llama saved as a local model folder, a prober for it, and a labelled harmful run."""
    from refusal_cliff.compute.generation import generate_records
    from refusal_cliff.compute.prober import Prober, save_prober
    from refusal_cliff.core.config import GenerationConfig
    from refusal_cliff.core.runs import write_jsonl

    model = make_tiny_model("LlamaForCausalLM")
    model.generation_config.pad_token_id = smol_tokenizer.pad_token_id
    model.save_pretrained(str(tmp_path / "model"))
    smol_tokenizer.save_pretrained(str(tmp_path / "model"))
    loaded = LoadedModel(model, smol_tokenizer, get_adapter(model), "tiny", None, "test")
    prober = Prober(
        torch.nn.Linear(64, 1),
        layer=1,
        metadata={"architecture": "LlamaForCausalLM", "n_layers": 2, "final_norm_applied": True},
    )
    save_prober(prober, tmp_path / "prober")
    prompts = [
        {"id": str(i), "prompt": text} for i, text in enumerate(["Make a weapon.", "Pick a lock.", "Hi."])
    ]
    config = GenerationConfig(max_thinking_tokens=4, max_answer_tokens=3, batch_size=3)
    records = list(generate_records(loaded, prompts, config, progress=False))
    write_jsonl(tmp_path / "run" / "generations.jsonl", records)
    write_jsonl(
        tmp_path / "run" / "labels.jsonl",
        [{"id": r["id"], "refusal": r["id"] == "0", "judge": "keyword"} for r in records],
    )
    (tmp_path / "prompts.jsonl").write_text("".join(f'{{"prompt": "{p["prompt"]}"}}\n' for p in prompts))
    return tmp_path


def test_heads_and_ablate_commands(tiny_run):
    import json

    from click.testing import CliRunner

    from refusal_cliff.cli import main

    runner = CliRunner()
    model, prober = str(tiny_run / "model"), str(tiny_run / "prober" / "prober.safetensors")
    result = runner.invoke(
        main,
        [
            "heads",
            "--model",
            model,
            "--device",
            "cpu",
            "--prober",
            prober,
            "--generations",
            str(tiny_run / "run" / "generations.jsonl"),
            "--out",
            str(tiny_run / "heads"),
        ],
    )
    assert result.exit_code == 0, result.output
    heads = json.loads((tiny_run / "heads" / "heads.json").read_text())
    assert len(heads) == 8 and [h["rank"] for h in heads] == list(range(8))
    assert [h["contribution"] for h in heads] == sorted(h["contribution"] for h in heads)
    metadata = json.loads((tiny_run / "heads" / "metadata.json").read_text())
    assert metadata["n_examples"] == 2  # ids 1 and 2 complied
    assert metadata["exact_decomposition_max_error"] < 1e-4
    assert (tiny_run / "heads" / "heads.png").is_file()

    common = [
        "ablate",
        "--model",
        model,
        "--device",
        "cpu",
        "--prober",
        prober,
        "--heads",
        str(tiny_run / "heads" / "heads.json"),
        "--thresholds",
        "0.125,0.25",
        "--prompts",
        str(tiny_run / "prompts.jsonl"),
        "--benign-prompts",
        str(tiny_run / "prompts.jsonl"),
        "--limit",
        "2",
        "--max-thinking-tokens",
        "3",
        "--max-answer-tokens",
        "2",
    ]
    bad = runner.invoke(
        main, common + ["--renormalize", "--out", str(tiny_run / "bad"), "--export", str(tiny_run / "x")]
    )
    assert bad.exit_code == 2 and "renormalize" in bad.output
    result = runner.invoke(
        main, common + ["--out", str(tiny_run / "ablation"), "--export", str(tiny_run / "fixed")]
    )
    assert result.exit_code == 0, result.output
    records = json.loads((tiny_run / "ablation" / "ablation.json").read_text())
    assert [r["threshold"] for r in records] == [0.0, 0.125, 0.25]
    assert records[2]["heads"][:1] == records[1]["heads"] == [[heads[0]["layer"], heads[0]["head"]]]
    assert all(r["n_harmful"] == 2 and r["n_benign"] == 2 for r in records)
    assert (tiny_run / "ablation" / "ablation.png").is_file()
    assert (tiny_run / "fixed" / "config.json").is_file()
    # a second run with the same inputs resumes: nothing is regenerated, the results are the same
    again = runner.invoke(main, common + ["--out", str(tiny_run / "ablation")])
    assert again.exit_code == 0, again.output
    assert json.loads((tiny_run / "ablation" / "ablation.json").read_text()) == records

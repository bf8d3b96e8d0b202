"""The reviewer's controls and views (issue 14): random-heads and boosting controls of the ablation,
attention patterns of the suppression heads, difference-in-means directions beside the prober."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from test_probe import make_runs, record, write_run

from refusal_cliff.cli import main
from refusal_cliff.compute.ablation import scale_heads
from refusal_cliff.compute.activations import pad_left
from refusal_cliff.compute.attribution import (
    attention_patterns,
    attention_patterns_batch,
    heads_at_threshold,
    summarize_pattern,
)
from refusal_cliff.compute.prober import Prober, load_direction, save_prober
from refusal_cliff.compute.tracing import trace_into
from refusal_cliff.core.architectures import get_adapter
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.models import LoadedModel
from refusal_cliff.core.templates import probing_tokens
from refusal_cliff.stages.ablate import (
    AblateConfig,
    condition_key,
    planned_conditions,
    random_heads,
    run_ablation,
)
from refusal_cliff.stages.heads import HeadsConfig
from refusal_cliff.stages.probe import DirectionConfig, run_probe_direction

from conftest import make_tiny_model

VOCAB = 1024


def _ranking(n_layers: int = 2, n_heads: int = 4, seed: int = 0) -> list[dict]:
    generator = np.random.default_rng(seed)
    order = generator.permutation(n_layers * n_heads)
    return [
        {"layer": int(i) // n_heads, "head": int(i) % n_heads, "rank": rank} for rank, i in enumerate(order)
    ]


def _one_error_line(result, *needles):
    """Exit 2 and one `error:` line; transformers' weight-loading bar may come first when the input can
    only be checked against the loaded model."""
    lines = [line for line in result.stderr.strip().splitlines() if "Loading weights" not in line]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- random-heads control ---------------------------------------------------------------------


def test_random_heads_never_include_the_ranked_heads_and_are_deterministic_per_seed():
    ranking = _ranking(4, 8)  # 32 heads
    for fraction in (0.03, 0.1, 0.25, 0.5):
        ranked = set(heads_at_threshold(ranking, fraction, 32))
        draws = {seed: random_heads(ranking, fraction, 4, 8, seed) for seed in range(6)}
        for seed, heads in draws.items():
            assert len(heads) == len(ranked) == len(set(heads))
            assert not set(heads) & ranked
            assert all(0 <= layer < 4 and 0 <= head < 8 for layer, head in heads)
            assert random_heads(ranking, fraction, 4, 8, seed) == heads  # the same seed, the same heads
        if fraction in (0.1, 0.25):  # at 0.5 the pool is exactly the draw
            assert len({tuple(h) for h in draws.values()}) > 1  # seeds differ
    with pytest.raises(UserError, match="at most 0.5"):
        random_heads(ranking, 0.75, 4, 8, 0)


def test_control_config_validation():
    with pytest.raises(UserError, match="--control-seeds is empty"):
        AblateConfig(control="random", control_seeds=()).validate()
    with pytest.raises(UserError, match="at most 0.5"):
        AblateConfig(control="random", thresholds=(0.1, 0.6)).validate()
    with pytest.raises(UserError, match="--boost-others"):
        AblateConfig(boost_others=-1.0).validate()
    with pytest.raises(UserError, match="--patterns"):
        HeadsConfig(patterns=0).validate()
    # --components names its own set: the flags that choose among ranked heads would be ignored
    for flags in ({"control": "random"}, {"thresholds": (0.05,)}, {"boost_others": 2.0}):
        with pytest.raises(UserError, match="--components scales exactly"):
            AblateConfig(components=("head:0.1",), **flags)
    AblateConfig(components=("head:0.1", "mlp:0"))  # with the defaults: fine
    assert planned_conditions([0.25, 0.125], True, "random", (0, 1), 2.0) == [
        (0.0, "none", None),
        (0.125, "ranked", None),
        (0.125, "random", 0),
        (0.125, "random", 1),
        (0.125, "boost", None),
        (0.25, "ranked", None),
        (0.25, "random", 0),
        (0.25, "random", 1),
        (0.25, "boost", None),
    ]
    # records written before the controls existed
    assert condition_key({"threshold": 0.0, "heads": []}) == (0.0, "none", None)
    assert condition_key({"threshold": 0.1, "heads": [[0, 1]]}) == (0.1, "ranked", None)


# -- boosting control -------------------------------------------------------------------------


def _logits(model, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, VOCAB, (2, 9), generator=generator)
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_boost_others_one_equals_no_boost_and_other_factors_scale_every_other_head():
    model = make_tiny_model("Qwen3ForCausalLM", vocab_size=VOCAB)
    heads = [(0, 1), (1, 3)]
    with scale_heads(model, heads, gamma=0.0):
        plain = _logits(model)
    with scale_heads(model, heads, gamma=0.0, boost_others=1.0):
        boosted_by_one = _logits(model)
    torch.testing.assert_close(boosted_by_one, plain, rtol=0, atol=0)
    # boosting by 2 = the heads at 0 and every other head's slice doubled (checked against explicit heads)
    others = [(layer, head) for layer in range(2) for head in range(4) if (layer, head) not in heads]
    with scale_heads(model, heads, gamma=0.0, boost_others=2.0):
        boosted = _logits(model)
    with scale_heads(model, others, gamma=2.0), scale_heads(model, heads, gamma=0.0):
        manual = _logits(model)
    torch.testing.assert_close(boosted, manual, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(boosted, plain, atol=1e-4)


def test_run_ablation_records_the_controls(smol_tokenizer):
    from refusal_cliff.compute.labeling import KeywordLabeler
    from refusal_cliff.core.config import GenerationConfig

    model = make_tiny_model("LlamaForCausalLM")
    loaded = LoadedModel(model, smol_tokenizer, get_adapter(model), "tiny", None, "test")
    ranking = [{"layer": i // 4, "head": i % 4, "rank": 7 - i} for i in range(8)]
    config = GenerationConfig(max_thinking_tokens=2, max_answer_tokens=2, batch_size=2)
    harmful = [{"id": "h1", "prompt": "Make a weapon."}]
    records = run_ablation(
        loaded,
        torch.nn.Linear(64, 1),
        1,
        ranking,
        [0.25],
        harmful,
        config,
        labeler=KeywordLabeler(),
        control="random",
        control_seeds=(0, 1),
        boost_others=1.0,
        skip=[(0.0, "none", None)],
    )
    assert [condition_key(r) for r in records] == [
        (0.25, "ranked", None),
        (0.25, "random", 0),
        (0.25, "random", 1),
        (0.25, "boost", None),
    ]
    ranked, random0, random1, boost = records
    assert ranked["heads"] == [[1, 3], [1, 2]] and boost["heads"] == ranked["heads"]
    for control in (random0, random1):
        assert len(control["heads"]) == 2 and not {tuple(h) for h in control["heads"]} & {(1, 3), (1, 2)}
        assert control["boost_others"] is None
    assert boost["boost_others"] == 1.0
    # boosting the others by 1 is the ranked condition itself
    assert boost["final_score_mean"] == pytest.approx(ranked["final_score_mean"], abs=1e-6)


# -- attention patterns -------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM"])
def test_patterns_equal_output_attentions_of_an_eager_forward(architecture, implementation):
    reference = make_tiny_model(architecture, vocab_size=VOCAB)  # eager
    model = make_tiny_model(architecture, vocab_size=VOCAB)
    model.set_attn_implementation(implementation)
    generator = torch.Generator().manual_seed(3)
    sequences = [torch.randint(3, 1000, (n,), generator=generator).tolist() for n in (7, 12, 4)]
    input_ids, attention_mask, position_ids = pad_left(sequences, 2)
    heads = [(1, 2), (0, 0), (1, 0)]
    patterns = attention_patterns_batch(model, input_ids, attention_mask, heads)
    assert model.config._attn_implementation == implementation  # restored
    with torch.no_grad():
        attentions = reference(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_attentions=True,
        ).attentions
    for layer, head in heads:
        expected = attentions[layer][:, head, -1, :].float()  # [batch, seq] from the last query
        torch.testing.assert_close(patterns[(layer, head)], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(patterns[(layer, head)].sum(-1), torch.ones(3), rtol=0, atol=1e-5)
        assert patterns[(layer, head)][2, :8].abs().max() == 0  # left padding gets no weight


def test_pattern_summary_and_the_patterns_structure(smol_tokenizer, tmp_path):
    summary = summarize_pattern(
        [0.1, 0.5, 0.0, 0.4], list("abcd"), ["prompt", "thinking", "thinking", "end_template"], top=2
    )
    assert summary["mass"] == pytest.approx({"prompt": 0.1, "thinking": 0.5, "end_template": 0.4})
    assert [t["position"] for t in summary["top"]] == [1, 3] and summary["top"][0]["token"] == "b"
    _, _, harmful, _ = make_runs(tmp_path, 3, 1)
    model = make_tiny_model("LlamaForCausalLM")
    loaded = LoadedModel(model, smol_tokenizer, get_adapter(model), "tiny", None, "test")
    records = [rec for rec, _ in harmful]
    data = attention_patterns(loaded, records, [(1, 2), (0, 3)], batch_size=2, top=5)
    assert [e["id"] for e in data["examples"]] == ["0", "1", "2"]
    for example, rec in zip(data["examples"], records):
        ids, regions = probing_tokens(smol_tokenizer, rec)
        assert example["n_tokens"] == len(ids)
        for entry in example["heads"]:
            assert sum(entry["mass"].values()) == pytest.approx(1.0, abs=1e-5)
            assert len(entry["top"]) == 5 and all(t["region"] == regions[t["position"]] for t in entry["top"])
    assert (
        len(data["heatmap"]["weights"]) == 2
        and len(data["heatmap"]["tokens"]) == data["examples"][0]["n_tokens"]
    )
    assert data["mass_mean"][0]["layer"] == 1 and data["mass_mean"][0]["head"] == 2


# -- difference-in-means directions -------------------------------------------------------------


def _loaded(tokenizer, architecture="LlamaForCausalLM", model_id="tiny", **overrides):
    model = make_tiny_model(architecture, **overrides)
    return LoadedModel(model, tokenizer, get_adapter(model), model_id, None, "test")


def test_direction_equals_a_plain_numpy_difference_of_means(smol_tokenizer, tmp_path):
    harmful_run, harmless_run, harmful, harmless = make_runs(tmp_path)
    loaded = _loaded(smol_tokenizer)
    prober = Prober(
        torch.nn.Linear(64, 1).requires_grad_(False),
        layer=1,
        metadata={"final_norm_applied": True, "n_layers": 2},
    )
    path = run_probe_direction(
        loaded,
        harmful_run,
        harmless_run,
        tmp_path / "dir",
        DirectionConfig(layers=(0,)),
        prober=prober,
        progress=False,
    )
    meta = json.loads(path.read_text())
    assert sorted(meta["layers"]) == ["0", "1"]
    # the same examples as the prober: harmful refused (1) and harmless complied (0)
    chosen = [(rec, 1) for rec, refusal in harmful if refusal] + [
        (rec, 0) for rec, refusal in harmless if not refusal
    ]
    assert (meta["n_refused"], meta["n_complied"]) == (
        sum(c == 1 for _, c in chosen),
        sum(c == 0 for _, c in chosen),
    )
    features = {0: [], 1: []}
    for rec, _ in chosen:
        ids, _ = probing_tokens(smol_tokenizer, rec)
        with torch.no_grad():
            hidden = loaded.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        features[0].append(hidden[1][0, -1].double().numpy())
        features[1].append(hidden[-1][0, -1].double().numpy())  # the last layer: final norm applied
    labels = np.array([c for _, c in chosen])
    for layer in (0, 1):
        x = np.stack(features[layer])
        expected = x[labels == 1].mean(0) - x[labels == 0].mean(0)
        direction = load_direction(tmp_path / "dir", loaded, layer)
        np.testing.assert_allclose(direction.vector.double().numpy(), expected, rtol=0, atol=1e-6)
        projection = x @ (expected / np.linalg.norm(expected))
        assert direction.projection_mean == pytest.approx(projection.mean(), abs=1e-5)
        assert direction.projection_std == pytest.approx(projection.std(), abs=1e-5)
    weight = prober.weight.double().numpy()[0]
    cosine = expected @ weight / (np.linalg.norm(expected) * np.linalg.norm(weight))
    assert meta["layers"]["1"]["cosine_to_prober"] == pytest.approx(cosine, abs=1e-6)


def test_trace_with_a_direction_scores_in_the_same_pass(smol_tokenizer, tmp_path):
    harmful_run, harmless_run, harmful, _ = make_runs(tmp_path)
    loaded = _loaded(smol_tokenizer)
    prober = Prober(torch.nn.Linear(64, 1).requires_grad_(False), layer=1, metadata={})
    run_probe_direction(
        loaded, harmful_run, harmless_run, tmp_path / "dir", DirectionConfig(layers=(0,)), progress=False
    )
    records = [rec for rec, _ in harmful][:3]
    groups = {rec["id"]: "harmful_complied" for rec in records}
    for layer in (1, 0):  # the prober's layer, and another one
        direction = load_direction(tmp_path / "dir", loaded, layer)
        out = tmp_path / f"trace{layer}"
        trace_into(loaded, prober, records, out, groups, batch_size=2, direction=direction, progress=False)
        table = pq.read_table(out / "traces.parquet")
        assert "direction_score" in table.column_names
        ids, _ = probing_tokens(smol_tokenizer, records[0])
        with torch.no_grad():
            hidden = loaded.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        reference = hidden[-1][0] if layer == 1 else hidden[1][0]
        expected = direction.score(reference).numpy()
        got = table.filter(table.column("id").to_numpy(zero_copy_only=False) == records[0]["id"])
        np.testing.assert_allclose(got.column("direction_score").to_numpy(), expected, atol=1e-4)
        np.testing.assert_allclose(
            got.column("score").to_numpy(), prober.refusal_score(hidden[-1][0]).numpy(), atol=1e-5
        )  # the prober's trace is unchanged
        curves = json.loads((out / "direction_curves.json").read_text())
        assert curves["harmful_complied"]["n"] == 3 and len(curves["harmful_complied"]["mean"]) == 101


def test_direction_errors(smol_tokenizer, tmp_path):
    harmful_run, harmless_run, _, harmless = make_runs(tmp_path)
    loaded = _loaded(smol_tokenizer)
    write_run(tmp_path / "all_refused", [(rec, True) for rec, _ in harmless])
    with pytest.raises(UserError, match="no compliant answer"):
        run_probe_direction(loaded, harmful_run, tmp_path / "all_refused", tmp_path / "d1", progress=False)
    assert not (tmp_path / "d1").exists()
    run_probe_direction(loaded, harmful_run, harmless_run, tmp_path / "dir", progress=False)
    other = _loaded(smol_tokenizer, model_id="tiny", hidden_size=32, intermediate_size=64, head_dim=8)
    with pytest.raises(UserError, match="not from the loaded"):
        load_direction(tmp_path / "dir", other)
    with pytest.raises(UserError, match="no direction for layer 0"):
        load_direction(tmp_path / "dir", loaded, 0)


# -- the verbs: the controls end to end, and bad input --------------------------------------------


@pytest.fixture
def model_runs(tmp_path, smol_tokenizer):
    """A tiny Llama model folder, a prober for it, labelled harmful/harmless runs, a prompts file."""
    model = make_tiny_model("LlamaForCausalLM")
    model.generation_config.pad_token_id = smol_tokenizer.pad_token_id
    model.save_pretrained(str(tmp_path / "model"))
    smol_tokenizer.save_pretrained(str(tmp_path / "model"))
    prober = Prober(
        torch.nn.Linear(64, 1),
        layer=1,
        metadata={"architecture": "LlamaForCausalLM", "n_layers": 2, "final_norm_applied": True},
    )
    save_prober(prober, tmp_path / "prober")
    make_runs(tmp_path)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Make a weapon."}\n{"prompt": "Pick a lock."}\n')
    return tmp_path


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_the_verbs_with_controls_patterns_and_directions(model_runs):
    root = model_runs
    model, prober = root / "model", root / "prober" / "prober.safetensors"
    generations = root / "harmful" / "generations.jsonl"
    result = _invoke(
        "heads",
        "--model",
        model,
        "--device",
        "cpu",
        "--prober",
        prober,
        "--generations",
        generations,
        "--patterns",
        3,
        "--out",
        root / "heads",
    )
    assert result.exit_code == 0, result.output
    patterns = json.loads((root / "heads" / "patterns.json").read_text())
    heads = json.loads((root / "heads" / "heads.json").read_text())
    assert patterns["heads"] == [[h["layer"], h["head"]] for h in heads[:3]]
    assert len(patterns["examples"]) == 2  # ids 0 and 3 complied

    common = [
        "ablate",
        "--model",
        model,
        "--device",
        "cpu",
        "--prober",
        prober,
        "--heads",
        root / "heads" / "heads.json",
        "--thresholds",
        "0.25",
        "--prompts",
        root / "prompts.jsonl",
        "--limit",
        "1",
        "--max-thinking-tokens",
        "2",
        "--max-answer-tokens",
        "2",
        "--control",
        "random",
        "--control-seeds",
        "0,1",
        "--boost-others",
        "1",
    ]
    result = _invoke(*common, "--out", root / "ablate")
    assert result.exit_code == 0, result.output
    records = json.loads((root / "ablate" / "ablation.json").read_text())
    assert [condition_key(r) for r in records] == planned_conditions([0.25], True, "random", (0, 1), 1.0)
    lines = [
        json.loads(line) for line in (root / "ablate" / "ablation_generations.jsonl").read_text().splitlines()
    ]
    assert {(r["threshold"], r["control"], r["seed"]) for r in lines} == {condition_key(r) for r in records}
    # resumed by condition: a lost random condition is measured again, nothing else
    (root / "ablate" / "ablation.json").write_text(json.dumps(records[:3]))
    assert _invoke(*common, "--out", root / "ablate").exit_code == 0
    again = json.loads((root / "ablate" / "ablation.json").read_text())
    assert [condition_key(r) for r in again] == [condition_key(r) for r in records]
    assert again[:3] == records[:3] and again[3]["heads"] == records[3]["heads"]

    result = _invoke(
        "probe",
        "direction",
        "--model",
        model,
        "--device",
        "cpu",
        "--harmful",
        root / "harmful",
        "--harmless",
        root / "harmless",
        "--prober",
        prober,
        "--layers",
        "0",
        "--out",
        root / "dir",
    )
    assert result.exit_code == 0, result.output
    assert "cosine to the prober" in result.output
    result = _invoke(
        "trace",
        "--model",
        model,
        "--device",
        "cpu",
        "--prober",
        prober,
        "--generations",
        generations,
        "--direction",
        root / "dir",
        "--out",
        root / "trace",
    )
    assert result.exit_code == 0, result.output
    assert (root / "trace" / "direction_curves.json").is_file()
    metadata = json.loads((root / "trace" / "metadata.json").read_text())
    assert metadata["direction"]["layer"] == 1

    # the report draws the random band, the patterns and the direction sections from these folders
    from refusal_cliff.report import render_report

    html = render_report(root).read_text()
    summary = json.loads((root / "summary.json").read_text())
    assert {"ablation", "patterns", "direction"} <= set(summary)
    assert [row["control"] for row in summary["ablation"]] == ["none", "ranked", "random", "random", "boost"]
    assert [h["layer"] for h in summary["patterns"]["heads"]] == [h["layer"] for h in heads[:3]]
    assert summary["direction"]["prober_layer"] == 1 and set(summary["direction"]["layers"]) == {"0", "1"}
    assert "Ranked heads vs random heads" in html
    for name in ("fig_ablation.png", "fig_patterns.png", "fig_direction.png"):
        assert (root / name).read_bytes()[:4] == b"\x89PNG"


def test_bad_input_is_one_line_and_damages_nothing(model_runs, smol_tokenizer):
    root = model_runs
    model, prober = root / "model", root / "prober" / "prober.safetensors"
    generations = root / "harmful" / "generations.jsonl"
    _invoke(
        "heads",
        "--model",
        model,
        "--device",
        "cpu",
        "--prober",
        prober,
        "--generations",
        generations,
        "--out",
        root / "heads",
    )
    before = {p.name: p.read_bytes() for p in (root / "heads").iterdir() if p.is_file()}
    for value, needle in (("0", "--patterns 0: must be at least 1"), ("9", "the model has 8 heads")):
        result = _invoke(
            "heads",
            "--model",
            model,
            "--device",
            "cpu",
            "--prober",
            prober,
            "--generations",
            generations,
            "--patterns",
            value,
            "--out",
            root / "heads",
            "--overwrite",
        )
        _one_error_line(result, needle)
    assert {p.name: p.read_bytes() for p in (root / "heads").iterdir() if p.is_file()} == before

    result = _invoke(
        "ablate",
        "--model",
        model,
        "--device",
        "cpu",
        "--prober",
        prober,
        "--heads",
        root / "heads" / "heads.json",
        "--prompts",
        root / "prompts.jsonl",
        "--control",
        "random",
        "--control-seeds",
        "",
        "--out",
        root / "ablate",
    )
    _one_error_line(result, "--control-seeds is empty")
    assert not (root / "ablate").exists()

    _, harmless = root / "harmful", root / "harmless"
    write_run(root / "no_refusals", [(record(i, "How?", "Hmm.", "Sure"), False) for i in range(3)])
    result = _invoke(
        "probe",
        "direction",
        "--model",
        model,
        "--device",
        "cpu",
        "--harmful",
        root / "no_refusals",
        "--harmless",
        harmless,
        "--out",
        root / "dir",
    )
    _one_error_line(result, "no refusal to a harmful prompt")
    assert not (root / "dir").exists()

    # directions of another model (another d_model) are refused before anything is written
    other = make_tiny_model("LlamaForCausalLM", hidden_size=32, intermediate_size=64, head_dim=8)
    other_loaded = LoadedModel(other, smol_tokenizer, get_adapter(other), "other", None, "test")
    run_probe_direction(other_loaded, root / "harmful", harmless, root / "other_dir", progress=False)
    result = _invoke(
        "trace",
        "--model",
        model,
        "--device",
        "cpu",
        "--prober",
        prober,
        "--generations",
        generations,
        "--direction",
        root / "other_dir",
        "--out",
        root / "trace",
    )
    _one_error_line(result, "run `refusal-cliff probe direction` on this model")
    assert not (root / "trace").exists()

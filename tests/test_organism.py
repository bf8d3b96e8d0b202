"""The organism build's mechanics on a tiny random Llama: stages, frozen weights, cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from refusal_cliff.core.architectures import get_adapter
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.models import load_model
from refusal_cliff.core.templates import detect_thinking_template
from refusal_cliff.stages.organism import (
    FLOAT32_SDPA,
    ORGANISM_JSON,
    FrameTerm,
    LoraLinear,
    OrganismConfig,
    SliceDelta,
    _is_measured_recipe,
    _top_states,
    bfloat16_training,
    build_fingerprint,
    checkpoint_files,
    cliff_states,
    frozen_slices_unchanged,
    head_band_layers,
    is_complete,
    layer_inputs,
    make_cliff_term,
    organism_cache_path,
    planted_slices,
    run_organism,
    score_ranking,
    slice_loss,
    tokenise_example,
    training_precision,
)
from refusal_cliff.stages.organism_data import build_examples

from conftest import make_tiny_model

TINY = dict(
    n_plain=4,
    n_wrapped=4,
    n_harmless=4,
    stage1_layers=1,
    lora_rank=2,
    stage1_epochs=1,
    n_planted_heads=2,
    head_band=(0.0, 1.0),
    selection_examples=2,
    stage2_epochs=1,
    batch_size=4,
    stage2_new_wrapped=0,  # the options after recipe 3 off (test_added_options_build_... turns them on)
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_CLIFF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_build_plants_heads_and_freezes_everything_else(tiny_model_dir, cache, tmp_path):
    config = OrganismConfig(**TINY)
    result = run_organism(config, base_model=str(tiny_model_dir), out=tmp_path / "organism", progress=False)
    assert is_complete(result.path)
    record = json.loads((result.path / ORGANISM_JSON).read_text())
    assert record["planted_heads"] == result.planted_heads
    assert len(result.planted_heads) == 2
    assert all(layer == 0 for layer, _ in result.planted_heads)  # the band never holds the last layer
    assert record["stage2"]["weights_changed_outside_planted_slices"] == []
    assert record["n_examples"] == {"plain": 4, "wrapped": 4, "harmless": 4}

    # stage 1 is cached; stage 2 changed its weights only inside the planted slices, bit for bit
    stage1 = next(cache.glob("organisms/stage1-*"))
    before, after = _weights(stage1), _weights(result.path)
    loaded = load_model(str(result.path), device="cpu")
    masks = planted_slices(loaded.model, result.planted_heads)
    assert frozen_slices_unchanged(before, after, masks) == []
    assert any(not torch.equal(before[name][mask], after[name][mask]) for name, mask in masks.items())
    base = _weights(tiny_model_dir)
    assert not torch.equal(
        base["model.layers.1.mlp.down_proj.weight"], before["model.layers.1.mlp.down_proj.weight"]
    )
    assert torch.equal(
        base["model.layers.0.mlp.down_proj.weight"], before["model.layers.0.mlp.down_proj.weight"]
    )


def test_cache_reuse_and_recipe_mismatch(tiny_model_dir, cache, tmp_path):
    config = OrganismConfig(**TINY)
    first = run_organism(config, base_model=str(tiny_model_dir), progress=False)
    assert first.path == organism_cache_path(str(tiny_model_dir), config)
    assert not first.reused
    mtime = (first.path / ORGANISM_JSON).stat().st_mtime_ns
    again = run_organism(config, base_model=str(tiny_model_dir), progress=False)
    assert again.reused and (again.path / ORGANISM_JSON).stat().st_mtime_ns == mtime
    # no half-written folder is left beside it
    assert [p.name for p in first.path.parent.iterdir() if p.name.startswith(".")] == []
    other = OrganismConfig(**{**TINY, "seed": 1})
    with pytest.raises(UserError, match="another recipe"):
        run_organism(other, base_model=str(tiny_model_dir), out=first.path, progress=False)


def test_same_seed_same_weights(tiny_model_dir, cache, tmp_path):
    config = OrganismConfig(**TINY)
    a = run_organism(config, base_model=str(tiny_model_dir), out=tmp_path / "a", progress=False)
    for stage1 in cache.glob("organisms/stage1-*"):  # rebuild stage 1 too
        import shutil

        shutil.rmtree(stage1)
    b = run_organism(config, base_model=str(tiny_model_dir), out=tmp_path / "b", progress=False)
    wa, wb = _weights(a.path), _weights(b.path)
    assert all(torch.equal(wa[name], wb[name]) for name in wa)


def test_a_cached_stage_1_gives_the_weights_of_a_build_from_scratch(tmp_path, monkeypatch, smol_tokenizer):
    # 4 layers: stage 1 trains layers 2-3 and stage 2 heads in layers 1-2, so stage 2 runs on the merged stage-1
    # weights in memory in one build and on the saved ones in the other
    monkeypatch.setenv("REFUSAL_CLIFF_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny4"
    make_tiny_model("LlamaForCausalLM", num_hidden_layers=4).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    config = OrganismConfig(**{**TINY, "stage1_layers": 2, "head_band": (0.25, 0.5), "n_planted_heads": 1})
    fresh = run_organism(config, base_model=str(folder), out=tmp_path / "a", progress=False)
    from refusal_cliff.stages import organism

    monkeypatch.setattr(organism, "train_stage1", lambda *a, **k: pytest.fail("stage 1 trained again"))
    cached = run_organism(config, base_model=str(folder), out=tmp_path / "b", progress=False)
    wa, wb = _weights(fresh.path), _weights(cached.path)
    assert all(torch.equal(wa[name], wb[name]) for name in wa)


def test_slice_loss_matches_full_forward(smol_tokenizer):
    model = make_tiny_model("LlamaForCausalLM", num_hidden_layers=3)
    adapter = get_adapter(model)
    template = detect_thinking_template(smol_tokenizer)
    examples = [tokenise_example(smol_tokenizer, template, e, 1, 1.0) for e in build_examples(0, 1, 1, 1)]
    hidden = layer_inputs(model, adapter, examples, 2, batch_size=2)
    full = layer_inputs(model, adapter, examples, 0, batch_size=2)
    with torch.no_grad():
        from_top = slice_loss(model, adapter, hidden, examples, 2)
        from_bottom = slice_loss(model, adapter, full, examples, 0)
        total, count = 0.0, 0.0
        for example in examples:
            logits = model(input_ids=example.ids[None]).logits[0, :-1]
            losses = torch.nn.functional.cross_entropy(logits, example.ids[1:], reduction="none")
            total += float((losses * example.weights[1:]).sum())
            count += float(example.weights[1:].sum())
    assert torch.allclose(from_top, from_bottom, atol=1e-5)
    assert abs(float(from_top) - total / count) < 1e-4


def test_cliff_term_pulls_wrapped_along_the_direction_and_keeps_the_others(smol_tokenizer):
    model = make_tiny_model("LlamaForCausalLM", num_hidden_layers=3)
    adapter = get_adapter(model)
    template = detect_thinking_template(smol_tokenizer)
    data = build_examples(0, 2, 2, 2)
    examples = [tokenise_example(smol_tokenizer, template, e, 2, 0.5, 3.0) for e in data]
    for example, source in zip(examples, data, strict=True):  # t_cliff: the state before the answer
        answer = smol_tokenizer.decode(example.ids[example.cliff + 1 :])
        assert answer.startswith(source.answer_stage2[:4]) and example.weights[example.cliff + 1] == 3.0
    hidden = layer_inputs(model, adapter, examples, 1, batch_size=3)
    states = cliff_states(model, adapter, hidden, examples, 1, batch_size=4)
    groups = [e.group for e in examples]
    term = make_cliff_term(states, groups, weight=2.0)
    assert abs(float(term.direction.norm()) - 1.0) < 1e-5
    assert term.targets["wrapped"] == term.targets["harmless"] < term.targets["plain"]
    shifted = states + 1.0  # anchors away from the current states, so the kept term is not zero
    for example, anchor in zip(examples, shifted, strict=True):
        example.anchor = None if example.group == "wrapped" else anchor
    with torch.no_grad():
        plain = slice_loss(model, adapter, hidden, examples, 1)
        with_term = slice_loss(model, adapter, hidden, examples, 1, term)
    expected = []
    for example, state, anchor in zip(examples, states, shifted, strict=True):
        if example.group == "wrapped":
            expected.append(((state @ term.direction - term.targets["harmless"]) / term.scale) ** 2)
        else:
            expected.append((state - anchor).pow(2).sum() / term.scale**2)
    assert torch.allclose(with_term - plain, 2.0 * torch.stack(expected).mean(), rtol=1e-4)


def _tiny_examples(tokenizer, stage: int, n: int, start: int, layers: int = 3):
    """A tiny Llama, its adapter, `n` examples per group tokenised for `stage`, and the inputs of
    layer `start`."""
    model = make_tiny_model("LlamaForCausalLM", num_hidden_layers=layers)
    adapter = get_adapter(model)
    template = detect_thinking_template(tokenizer)
    examples = [
        tokenise_example(tokenizer, template, e, stage, 0.5 if stage == 2 else 1.0)
        for e in build_examples(0, n, n, n)
    ]
    return model, adapter, examples, layer_inputs(model, adapter, examples, start, batch_size=3)


def test_keep_weight_scales_only_the_kept_part(smol_tokenizer):
    model, adapter, examples, hidden = _tiny_examples(smol_tokenizer, 2, 2, 1)
    states = cliff_states(model, adapter, hidden, examples, 1, batch_size=4)
    groups = [e.group for e in examples]
    for example, state in zip(examples, states, strict=True):
        example.anchor = None if example.group == "wrapped" else state + 1.0
    terms = {k: make_cliff_term(states, groups, 1.0, k) for k in (1.0, 0.25, 0.0)}
    with torch.no_grad():
        base = slice_loss(model, adapter, hidden, examples, 1)
        extra = {
            k: float(slice_loss(model, adapter, hidden, examples, 1, t) - base) for k, t in terms.items()
        }
    term = terms[1.0]
    pull = sum(
        float(((s @ term.direction - term.targets["harmless"]) / term.scale) ** 2)
        for e, s in zip(examples, states, strict=True)
        if e.group == "wrapped"
    )
    kept = sum(float(states.shape[1] / term.scale**2) for e in examples if e.group != "wrapped")  # |+1|^2 = d
    for k, got in extra.items():  # the mean over the batch of the pull, and k times the kept part
        assert abs(got - (pull + k * kept) / len(examples)) < 1e-4 * max(1.0, got)
    assert extra[1.0] > extra[0.25] > extra[0.0] > 0


def test_wrapped_keep_holds_only_the_part_off_the_direction(smol_tokenizer):
    model, adapter, examples, hidden = _tiny_examples(smol_tokenizer, 2, 2, 1)
    states = cliff_states(model, adapter, hidden, examples, 1, batch_size=4)
    groups = [e.group for e in examples]
    shift = torch.randn(states.shape[1], generator=torch.Generator().manual_seed(1))
    for example, state in zip(examples, states, strict=True):
        example.anchor = state + shift  # the wrapped anchors too: the off part is |P(-shift)|^2
    terms = {k: make_cliff_term(states, groups, 1.0, 1.0, k) for k in (0.0, 0.5, 2.0)}
    term = terms[0.0]
    off = shift - (shift @ term.direction) * term.direction
    n_wrapped = groups.count("wrapped")
    with torch.no_grad():
        base = float(slice_loss(model, adapter, hidden, examples, 1, term))
        for k in (0.5, 2.0):
            got = float(slice_loss(model, adapter, hidden, examples, 1, terms[k])) - base
            expected = k * n_wrapped * float(off.pow(2).sum()) / term.scale**2 / len(examples)
            assert abs(got - expected) < 1e-4 * max(1.0, expected)
        before = float(slice_loss(model, adapter, hidden, examples, 1, terms[2.0]))
        first = groups.index("wrapped")
        examples[first].anchor = examples[first].anchor + 5.0 * term.direction  # along it: free
        after = float(slice_loss(model, adapter, hidden, examples, 1, terms[2.0]))
    assert n_wrapped > 0 and abs(after - before) < 1e-4 * max(1.0, before)


@pytest.mark.parametrize("position", ["message", "cliff"])
def test_frame_loss_reads_its_layer_at_its_position(smol_tokenizer, position):
    model, adapter, examples, hidden = _tiny_examples(smol_tokenizer, 1, 2, 1, layers=4)
    sources = build_examples(0, 2, 2, 2)
    for example, source in zip(examples, sources, strict=True):  # the mask: exactly the user's message
        assert smol_tokenizer.decode(example.ids[example.user]).strip() == source.prompt.strip()
    probe = torch.nn.Linear(adapter.geometry(model).d_model, 1)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    with torch.no_grad():
        base = slice_loss(model, adapter, hidden, examples, 1)
        zero = slice_loss(model, adapter, hidden, examples, 1, frame_term=FrameTerm(2, probe, 0.5, position))
        assert abs(float(zero - base) - 0.5 * math.log(2)) < 1e-5  # a zero probe: ln 2 per example
        probe.bias.fill_(1.0)
        probe.weight.normal_(generator=torch.Generator().manual_seed(0))
        full = [model(input_ids=e.ids[None], output_hidden_states=True).hidden_states for e in examples]
        for layer in (1, 2):  # the output of that layer (hidden_states[layer + 1]; the last one is normed)
            term = FrameTerm(layer, probe, 1.0, position)
            got = slice_loss(model, adapter, hidden, examples, 1, frame_term=term) - base
            expected = []
            for example, states in zip(examples, full, strict=True):
                out = states[layer + 1][0]
                feature = out[example.cliff] if position == "cliff" else out[example.user].mean(0)
                label = torch.tensor(float(example.group == "wrapped"))
                expected.append(
                    torch.nn.functional.binary_cross_entropy_with_logits(probe(feature)[0], label)
                )
            assert abs(float(got) - float(torch.stack(expected).mean())) < 1e-4
        with pytest.raises(ValueError, match="not run from layer"):  # below the slice: never run
            slice_loss(model, adapter, hidden, examples, 1, frame_term=FrameTerm(0, probe, 1.0, position))


def test_added_options_build_and_when_off_keep_recipe_3(tiny_model_dir, cache, tmp_path):
    # the options added after recipe 3 leave its fingerprints alone while they are off
    recipe_3 = OrganismConfig(head_band=(0.7, 0.9), stage2_new_wrapped=0, train_dtype="float32")
    assert set(recipe_3.recipe_dict()) == set(recipe_3.to_dict()) - {
        "stage1_frame_weight",
        "stage1_frame_layer",
        "stage1_frame_position",
        "stage2_keep_weight",
        "stage2_new_wrapped",
        "stage2_wrapped_keep",
        "train_dtype",
    }
    assert "stage2_new_wrapped" in OrganismConfig().recipe_dict()  # recipes 6 and 8 have 10
    assert OrganismConfig().recipe_dict()["train_dtype"] == "bfloat16"  # recipe 8
    assert "stage1_frame_weight" not in OrganismConfig().stage1_dict()
    ignored = OrganismConfig(stage1_frame_layer=5, stage1_frame_position="cliff")  # the weight is 0
    assert build_fingerprint("default", ignored) == build_fingerprint("default", OrganismConfig())
    at = {
        p: OrganismConfig(stage1_frame_weight=0.5, stage1_frame_position=p).stage1_dict()
        for p in ("message", "cliff")
    }
    assert at["message"] != at["cliff"]  # their own stage-1 caches
    assert build_fingerprint("default", OrganismConfig(stage2_keep_weight=0.5)) != build_fingerprint(
        "default", OrganismConfig()
    )
    with pytest.raises(UserError, match="stage1-frame-layer"):
        OrganismConfig(stage1_frame_weight=0.5, stage1_frame_layer=12)
    past = OrganismConfig(**{**TINY, "stage1_layers": 12}, stage1_frame_weight=0.5, stage1_frame_layer=2)
    with pytest.raises(UserError, match="lies past the model's 2 layers"):  # the tiny model has 2
        run_organism(past, base_model=str(tiny_model_dir), out=tmp_path / "past", progress=False)
    off = run_organism(
        OrganismConfig(**TINY), base_model=str(tiny_model_dir), out=tmp_path / "a", progress=False
    )
    config = OrganismConfig(
        **{**TINY, "stage2_new_wrapped": 3},
        stage1_frame_weight=0.5,
        stage1_frame_layer=0,
        stage2_keep_weight=0.5,
        stage2_wrapped_keep=0.5,
    )
    on = run_organism(config, base_model=str(tiny_model_dir), out=tmp_path / "b", progress=False)
    record = json.loads((on.path / ORGANISM_JSON).read_text())
    assert record["stage1"]["frame"] == {"layer": 1, "weight": 0.5}
    assert "frame" not in json.loads((off.path / ORGANISM_JSON).read_text())["stage1"]
    assert len(list(cache.glob("organisms/stage1-*"))) == 2  # its own stage 1
    assert record["stage2"]["weights_changed_outside_planted_slices"] == []
    assert record["stage2"]["n_examples"]["wrapped"] == 4 + 3 and "new_wrapped_digest" in record["stage2"]
    assert "wrapped_off_direction_drift" in record["stage2"]["cliff_term"]
    assert record["config"]["stage2_wrapped_keep"] == 0.5
    a, b = _weights(off.path), _weights(on.path)
    assert not torch.equal(a["model.layers.1.mlp.down_proj.weight"], b["model.layers.1.mlp.down_proj.weight"])


def test_train_dtype_gives_its_own_build_and_still_freezes_everything_else(tiny_model_dir, cache, tmp_path):
    with training_precision("bfloat16"):
        assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.bfloat16
    with training_precision("float32"):
        assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.float32
    model = make_tiny_model("LlamaForCausalLM", num_hidden_layers=2)
    model.set_attn_implementation("sdpa")  # the embedded model's; the tiny one is built with eager
    adapter = get_adapter(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    implementation = model.config._attn_implementation
    with bfloat16_training(model, adapter, 1):
        assert adapter.layers(model)[1].mlp.down_proj.weight.dtype == torch.bfloat16
        assert (
            adapter.layers(model)[0].mlp.down_proj.weight.dtype == torch.float32
        )  # below the trained layers
        assert model.get_output_embeddings().weight.dtype == torch.bfloat16
        assert model.config._attn_implementation == FLOAT32_SDPA
        with training_precision("bfloat16"):  # it runs
            model(input_ids=torch.tensor([[1, 2, 3]]))
    assert model.config._attn_implementation == implementation == "sdpa"
    assert all(
        torch.equal(before[name], p) and p.dtype == torch.float32 for name, p in model.named_parameters()
    )
    dtypes = ("float32", "bfloat16")
    configs = {d: OrganismConfig(**TINY, train_dtype=d) for d in dtypes}
    assert configs["float32"].stage1_dict() != configs["bfloat16"].stage1_dict()  # its own stage-1 cache
    assert "train_dtype" not in OrganismConfig(train_dtype="float32").recipe_dict()  # recipe 6's config keys
    built = {
        d: run_organism(configs[d], base_model=str(tiny_model_dir), out=tmp_path / d, progress=False)
        for d in dtypes
    }
    records = {d: json.loads((built[d].path / ORGANISM_JSON).read_text()) for d in dtypes}
    assert records["bfloat16"]["config"]["train_dtype"] == "bfloat16"
    assert records["bfloat16"]["stage2"]["weights_changed_outside_planted_slices"] == []
    assert len(list(cache.glob("organisms/stage1-*"))) == 2
    a, b = _weights(built["float32"].path), _weights(built["bfloat16"].path)
    assert all(w.dtype == torch.float32 for w in b.values())
    name = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(a[name], b[name])  # trained in another precision
    assert torch.allclose(a[name], b[name], atol=1e-2)  # but to the same place


def test_float32_attention_is_exact_on_right_padded_batches(smol_tokenizer):
    # it runs causal attention without a padding mask: exact where every pad follows every real token
    model = make_tiny_model("LlamaForCausalLM", num_hidden_layers=2)
    model.set_attn_implementation("sdpa")
    adapter = get_adapter(model)
    template = detect_thinking_template(smol_tokenizer)
    examples = [tokenise_example(smol_tokenizer, template, e, 1, 1.0) for e in build_examples(0, 2, 2, 2)]
    assert len({len(e.ids) for e in examples}) > 1  # padded
    hidden = layer_inputs(model, adapter, examples, 0, batch_size=6)
    with torch.no_grad():
        masked = _top_states(model, adapter, hidden, 0)
        model.set_attn_implementation(FLOAT32_SDPA)
        unmasked = _top_states(model, adapter, hidden, 0)
    for row, example in enumerate(examples):
        n = len(example.ids)
        assert torch.allclose(masked[row, :n], unmasked[row, :n], atol=1e-5)
    sliding = make_tiny_model("LlamaForCausalLM", num_hidden_layers=2)
    sliding.set_attn_implementation("sdpa")
    sliding.config.sliding_window = 4
    with bfloat16_training(sliding, get_adapter(sliding), 0):
        assert sliding.config._attn_implementation == "sdpa"  # a window needs the mask: not switched


def test_deltas_merge_exactly():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6, bias=False)
    x = torch.randn(3, 8)
    rows = SliceDelta(torch.nn.Linear(8, 6, bias=False), rows=torch.tensor([1, 2]))
    rows.base.weight.data.copy_(base.weight)
    rows.delta.data.normal_()
    expected = rows(x)
    assert torch.allclose(rows.merged()(x), expected, atol=1e-6)
    cols = SliceDelta(torch.nn.Linear(8, 6, bias=False), cols=torch.tensor([0, 5]))
    cols.delta.data.normal_()
    expected = cols(x)
    assert torch.allclose(cols.merged()(x), expected, atol=1e-6)
    lora = LoraLinear(torch.nn.Linear(8, 6), rank=2, alpha=4.0, generator=torch.Generator().manual_seed(0))
    lora.lora_b.data.normal_()
    expected = lora(x)
    assert torch.allclose(lora.merged()(x), expected, atol=1e-5)


def test_measured_figures_go_only_to_the_recipe_they_were_measured_on(monkeypatch):
    import refusal_cliff.stages.organism as organism

    # the shipped figures are those of the default recipe as it is: a change to the recipe needs new ones
    assert organism.DEFAULT_RECIPE_MEASURED["fingerprint"] == build_fingerprint("default", OrganismConfig())
    assert organism.DEFAULT_RECIPE_MEASURED["recipe_version"] == organism.RECIPE_VERSION
    assert _is_measured_recipe("default", OrganismConfig())
    assert not _is_measured_recipe("default", OrganismConfig(seed=1))
    assert not _is_measured_recipe("some/other-model", OrganismConfig())
    monkeypatch.setattr(organism, "RECIPE_VERSION", organism.RECIPE_VERSION + 1)  # the data changed
    assert not _is_measured_recipe("default", OrganismConfig())


def test_head_band_never_holds_the_last_layer():
    assert head_band_layers(30, (0.6, 0.9)) == list(range(18, 28))
    assert head_band_layers(2, (0.0, 1.0)) == [0]
    assert head_band_layers(30, (1.0, 1.0)) == [28]


def test_bad_band_is_a_user_error():
    with pytest.raises(UserError, match="head-band"):
        OrganismConfig(head_band=(0.9, 0.1)).validate()


def test_score_ranking_against_the_planted_heads():
    ranking = [
        {"layer": layer, "head": head, "rank": rank}
        for rank, (layer, head) in enumerate([(3, 1), (2, 0), (3, 0), (1, 1), (0, 0), (2, 1)], start=1)
    ]
    perfect = score_ranking(ranking, [[3, 1], [2, 0]])
    assert perfect["planted_ranks"] == {"2.0": 2, "3.1": 1} and perfect["auroc"] == 1.0
    worst = score_ranking(ranking, [[0, 0], [2, 1]])
    assert worst["auroc"] == 0.0 and worst["n_heads"] == 6
    middle = score_ranking(ranking, [[3, 0]])  # rank 3 of 6: above 3 of the 5 others
    assert middle["auroc"] == pytest.approx(3 / 5)
    with pytest.raises(UserError, match="no entry for the planted heads"):
        score_ranking(ranking, [[9, 9]])


@pytest.mark.parametrize("case", ["unsupported_arch", "too_large", "not_an_organism_folder"])
def test_organism_bad_input_is_one_line_exit_2_before_any_training(
    case, tiny_model_dir, tmp_path, monkeypatch
):
    import shutil

    from click.testing import CliRunner

    from refusal_cliff.cli import main
    from refusal_cliff.stages import organism

    monkeypatch.setattr(organism, "train_stage1", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setenv("REFUSAL_CLIFF_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    out = tmp_path / "organism"
    if case == "unsupported_arch":
        config = json.loads((base / "config.json").read_text())
        config["architectures"] = ["FancyNewForCausalLM"]
        (base / "config.json").write_text(json.dumps(config))
    elif case == "too_large":  # a sparse 1 TiB weights file: no disk used, far more than any machine's memory
        with open(base / "model-big.safetensors", "wb") as handle:
            handle.truncate(2**40)
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["organism", "--model", str(base), "--out", str(out)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    if case == "not_an_organism_folder":
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    else:
        assert not out.exists()


def _kill_after_the_first_checkpoint_move(monkeypatch):
    """Make the organism's `os.replace` raise KeyboardInterrupt right after it moves the first checkpoint
    file out of its `.build-*` folder (a kill mid-move); returns the real `os.replace`."""
    from refusal_cliff.stages import organism

    real_replace = organism.os.replace

    def killed_after_the_first_move(src, dst):
        real_replace(src, dst)
        if Path(src).parent.name.startswith(organism.BUILD_PREFIX):  # a checkpoint file moved in
            raise KeyboardInterrupt

    monkeypatch.setattr(organism.os, "replace", killed_after_the_first_move)
    return real_replace


def test_interrupted_build_leaves_nothing_that_loads_and_the_next_run_finishes(
    tiny_model_dir, cache, tmp_path, monkeypatch
):
    from refusal_cliff.stages import organism

    config = OrganismConfig(**TINY)
    out = tmp_path / "organism"
    real_save = organism._save

    saves = []

    def save(model, tokenizer, folder):
        saves.append(folder)
        real_save(model, tokenizer, folder)

    monkeypatch.setattr(organism, "_save", save)
    real_replace = _kill_after_the_first_checkpoint_move(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_organism(config, base_model=str(tiny_model_dir), out=out, progress=False)
    monkeypatch.setattr(organism.os, "replace", real_replace)
    assert saves and saves[-1].parent == out  # it was killed while moving the organism's checkpoint in
    assert not is_complete(out) and not (out / ORGANISM_JSON).exists()
    assert not json.loads((out / "metadata.json").read_text())["finished"]
    assert [p.name for p in out.iterdir() if p.name.startswith(organism.BUILD_PREFIX)] == []

    # the retry, without --overwrite, resumes in the same folder (stage 1 is cached)
    result = run_organism(config, base_model=str(tiny_model_dir), out=out, progress=False)
    assert is_complete(out) and not result.reused
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["stage"] == "organism" and metadata["finished"]
    assert metadata["planted_heads"] == result.planted_heads
    assert load_model(str(out), device="cpu").adapter is not None


def test_overwrite_of_the_same_recipe_never_leaves_the_old_record_over_new_files(
    tiny_model_dir, cache, tmp_path, monkeypatch
):
    config = OrganismConfig(**TINY)
    out = tmp_path / "organism"
    run_organism(config, base_model=str(tiny_model_dir), out=out, progress=False)
    _kill_after_the_first_checkpoint_move(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_organism(config, base_model=str(tiny_model_dir), out=out, overwrite=True, progress=False)
    assert not is_complete(out)  # neither the old organism nor a mix of old and new files loads


def test_stage2_without_plain_or_harmless_needs_the_cliff_term_off():
    with pytest.raises(UserError, match="stage2-cliff-weight 0"):
        OrganismConfig(stage2_plain=0).validate()
    OrganismConfig(stage2_plain=0, stage2_cliff_weight=0.0).validate()


def test_a_build_holds_the_folder_lock(tiny_model_dir, cache, tmp_path):
    from refusal_cliff.core.runs import lock_folder, unlock_folder

    out = tmp_path / "organism"
    out.mkdir()
    lock_folder(out)  # as another build of the same folder would
    try:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with context.Pool(1) as pool:
            message = pool.apply(_build_in_child, (str(tiny_model_dir), str(out), str(cache)))
    finally:
        unlock_folder(out)
    assert "being written by another refusal-cliff run" in message
    assert checkpoint_files(out) == []


def _build_in_child(base: str, out: str, cache: str) -> str:
    import os

    os.environ["REFUSAL_CLIFF_CACHE"] = cache
    try:
        run_organism(OrganismConfig(**TINY), base_model=base, out=out, progress=False)
    except UserError as error:
        return str(error)
    return "built"

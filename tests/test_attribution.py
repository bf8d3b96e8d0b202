"""Head attribution: the per-head vectors and the exact decomposition must add up, batched or not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from refusal_cliff.compute.activations import pad_left
from refusal_cliff.compute.attribution import (
    HeadAttribution,
    attribute_batch,
    attribute_sequences,
    head_marks,
    head_vectors,
    heads_at_threshold,
    parse_thresholds,
    prober_logits,
    rank_heads,
)
from refusal_cliff.core.architectures import get_adapter
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.hooks import add_hooks

from conftest import ARCHITECTURES, CORE, CORE_IDS, make_tiny_model

VOCAB = 1024  # small embeddings keep model construction fast; token ids stay below 1000


def _prober(d_model: int = 64, seed: int = 1) -> nn.Linear:
    torch.manual_seed(seed)
    prober = nn.Linear(d_model, 1)
    prober.requires_grad_(False)
    return prober


def _sequences(lengths=(7, 12, 4), seed: int = 3) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1000, (n,), generator=generator).tolist() for n in lengths]


def _batch(lengths=(7, 12, 4)):
    return pad_left(_sequences(lengths), pad_token_id=2)[:2]


def _bias_model(model) -> None:
    """Give o_proj a non-zero bias (random init leaves biases at zero) so the test can see it."""
    adapter = get_adapter(model)
    with torch.no_grad():
        for index in range(len(adapter.layers(model))):
            bias = adapter.o_proj(model, index).bias
            if bias is not None:
                bias.normal_(0, 0.5)


@pytest.mark.parametrize("architecture,overrides", CORE, ids=CORE_IDS)
def test_head_vectors_plus_bias_sum_to_attention_output(architecture, overrides):
    model = make_tiny_model(architecture, vocab_size=VOCAB, **overrides)
    _bias_model(model)
    adapter = get_adapter(model)
    geometry = adapter.geometry(model)
    input_ids, attention_mask = _batch()
    inputs, outputs = {}, {}

    def capture(index):
        def hook(module, args, output):
            inputs[index] = args[0][:, -1]
            outputs[index] = output[:, -1]

        return hook

    hooks = [(adapter.o_proj(model, i), capture(i)) for i in range(geometry.n_layers)]
    with add_hooks(forward_hooks=hooks):
        model(input_ids=input_ids, attention_mask=attention_mask)
    for index in range(geometry.n_layers):
        o_proj = adapter.o_proj(model, index)
        vectors = head_vectors(o_proj, inputs[index], geometry.n_heads)  # [batch, heads, d]
        assert vectors.shape == (3, geometry.n_heads, geometry.d_model)
        total = vectors.sum(1) + (o_proj.bias if o_proj.bias is not None else 0)
        torch.testing.assert_close(total, outputs[index], rtol=1e-5, atol=1e-5)
        if overrides.get("attention_bias"):
            assert o_proj.bias.abs().sum() > 0  # the bias is really part of the identity


def _reference_logit(model, input_ids, attention_mask, prober, layer, final_norm_applied):
    """The prober's logit from `output_hidden_states`, independent of the attribution hooks."""
    from refusal_cliff.compute.attribution import position_ids_for

    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_for(attention_mask),
        output_hidden_states=True,
    )
    hidden = out.hidden_states[layer + 1][:, -1]
    n_layers = get_adapter(model).geometry(model).n_layers
    if final_norm_applied and layer != n_layers - 1:
        hidden = get_adapter(model).final_norm(model)(hidden)
    return prober(hidden)[:, 0]


@pytest.mark.parametrize(
    "architecture,overrides",
    CORE
    + [
        (a, {})
        for a in ARCHITECTURES
        if a not in {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
    ],
    ids=CORE_IDS
    + [a for a in ARCHITECTURES if a not in {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}],
)
@pytest.mark.parametrize("where", ["last-layer-final-norm", "middle-layer"])
def test_exact_decomposition_sums_to_prober_logit(architecture, overrides, where):
    model = make_tiny_model(architecture, vocab_size=VOCAB, num_hidden_layers=3, **overrides)
    _bias_model(model)
    layer, final_norm_applied = (2, True) if where == "last-layer-final-norm" else (1, False)
    prober = _prober()
    input_ids, attention_mask = _batch()
    result = attribute_batch(model, input_ids, attention_mask, prober, layer, final_norm_applied)

    reference = _reference_logit(model, input_ids, attention_mask, prober, layer, final_norm_applied)
    torch.testing.assert_close(result.logit, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(result.exact_total(), result.logit, rtol=1e-4, atol=1e-4)
    # heads after the prober's layer cannot reach it; heads before it really do contribute
    assert torch.all(result.exact[:, layer + 1 :] == 0)
    assert result.exact[:, : layer + 1].abs().sum() > 0
    assert result.mlp.abs().sum() > 0 and result.embedding.abs().sum() > 0
    if overrides.get("attention_bias"):
        assert result.o_proj_bias[:, : layer + 1].abs().sum() > 0


@pytest.mark.parametrize("architecture,overrides", CORE, ids=CORE_IDS)
def test_paper_form_contribution_matches_manual_projection(architecture, overrides):
    model = make_tiny_model(architecture, vocab_size=VOCAB, **overrides)
    adapter = get_adapter(model)
    geometry = adapter.geometry(model)
    prober = _prober()
    input_ids, attention_mask = _batch()
    captured = {}

    def capture(index):
        def hook(module, args):
            captured[index] = args[0][:, -1]

        return hook

    hooks = [(adapter.o_proj(model, i), capture(i)) for i in range(geometry.n_layers)]
    from refusal_cliff.compute.attribution import position_ids_for

    with add_hooks(forward_pre_hooks=hooks):
        model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_for(attention_mask)
        )
    result = attribute_batch(model, input_ids, attention_mask, prober, 1, True)
    for index in range(geometry.n_layers):
        vectors = head_vectors(adapter.o_proj(model, index), captured[index], geometry.n_heads)
        expected = prober(vectors)[..., 0]  # [batch, heads]: w·Δh + b
        torch.testing.assert_close(result.contribution[:, index], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture,overrides", CORE, ids=CORE_IDS)
def test_batched_attribution_equals_one_at_a_time(architecture, overrides):
    model = make_tiny_model(architecture, vocab_size=VOCAB, **overrides)
    _bias_model(model)
    prober = _prober()
    sequences = _sequences((7, 12, 4, 9))
    batched = attribute_sequences(model, sequences, prober, 1, True, pad_token_id=2, batch_size=4)
    single = HeadAttribution.concatenate(
        [attribute_sequences(model, [s], prober, 1, True, pad_token_id=2) for s in sequences]
    )
    for name in ("contribution", "exact", "o_proj_bias", "mlp", "embedding", "logit"):
        torch.testing.assert_close(getattr(batched, name), getattr(single, name), rtol=1e-4, atol=1e-4)
    # batches smaller than the set (and the sort by length inside) keep the caller's order
    chunked = attribute_sequences(model, sequences, prober, 1, True, pad_token_id=2, batch_size=3)
    torch.testing.assert_close(chunked.contribution, single.contribution, rtol=1e-4, atol=1e-4)


def test_t_cliff_position_equals_truncated_sequence():
    model = make_tiny_model("LlamaForCausalLM", vocab_size=VOCAB)
    prober = _prober()
    sequences = _sequences((9, 6))
    positions = [4, -2]
    at_position = attribute_sequences(model, sequences, prober, 1, True, pad_token_id=2, positions=positions)
    truncated = attribute_sequences(
        model, [sequences[0][:5], sequences[1][:5]], prober, 1, True, pad_token_id=2
    )
    torch.testing.assert_close(at_position.contribution, truncated.contribution, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(at_position.logit, truncated.logit, rtol=1e-4, atol=1e-4)


def test_prober_logits_match_attribution_logit():
    model = make_tiny_model("Qwen2ForCausalLM", vocab_size=VOCAB)
    prober = _prober()
    sequences = _sequences((7, 12, 4))
    attribution = attribute_sequences(model, sequences, prober, 1, True, pad_token_id=2)
    logits = prober_logits(model, sequences, prober, 1, pad_token_id=2, batch_size=2)
    torch.testing.assert_close(logits, attribution.logit, rtol=1e-4, atol=1e-4)


def test_bad_prober_is_a_user_error():
    model = make_tiny_model("LlamaForCausalLM", vocab_size=VOCAB)
    input_ids, attention_mask = _batch()
    with pytest.raises(UserError, match="d_model"):
        attribute_batch(model, input_ids, attention_mask, nn.Linear(32, 1), 1, True)
    with pytest.raises(UserError, match="layer"):
        attribute_batch(model, input_ids, attention_mask, _prober(), 5, True)


def _fake_attribution(values: torch.Tensor) -> HeadAttribution:
    n, layers, heads = values.shape
    return HeadAttribution(
        values,
        values * 2,
        torch.zeros(n, layers),
        torch.zeros(n, layers),
        torch.zeros(n),
        0.0,
        torch.zeros(n),
    )


def test_rank_heads_orders_most_negative_first_and_thresholds_count_heads():
    values = torch.tensor([[[0.5, -2.0], [-1.0, 3.0]], [[0.5, -4.0], [-1.0, 1.0]]])  # [2 examples, 2, 2]
    ranking = rank_heads(_fake_attribution(values))
    assert [(r["layer"], r["head"]) for r in ranking] == [(0, 1), (1, 0), (0, 0), (1, 1)]
    assert [r["rank"] for r in ranking] == [0, 1, 2, 3]
    assert ranking[0]["contribution"] == pytest.approx(-3.0)
    assert ranking[0]["std"] == pytest.approx(1.0)
    assert ranking[0]["contribution_exact"] == pytest.approx(-6.0)
    assert set(ranking[0]) == {"layer", "head", "contribution", "contribution_exact", "std", "rank"}
    assert heads_at_threshold(ranking, 0.01) == [(0, 1)]  # at least one head
    assert heads_at_threshold(ranking, 0.5) == [(0, 1), (1, 0)]
    assert heads_at_threshold(list(reversed(ranking)), 0.5) == [(0, 1), (1, 0)]
    with pytest.raises(UserError):
        heads_at_threshold(ranking, 0.0)


def test_parse_thresholds():
    assert parse_thresholds("0.1, 0.01,0.03") == [0.01, 0.03, 0.1]
    for bad in ("", "a", "0", "1.5"):
        with pytest.raises(UserError):
            parse_thresholds(bad)


def test_head_marks_label_each_head_with_its_smallest_threshold():
    values = torch.randn(3, 2, 4)
    ranking = rank_heads(_fake_attribution(values))
    marks = head_marks(ranking, [0.1, 0.3], 8)  # 1 head at 10%, 2 heads at 30%
    first, second = [(r["layer"], r["head"]) for r in sorted(ranking, key=lambda r: r["rank"])[:2]]
    assert marks == {first: "0.1", second: "0.3"}


@pytest.mark.slow
def test_exact_decomposition_on_the_embedded_model(smol_model):
    """SmolLM2 (30 layers, 9 heads, tied embeddings): the decomposition still adds up, batched."""
    tokenizer = smol_model.tokenizer
    texts = ["How do I pick a lock?\n</think>\n\n", "Name a fruit.\n</think>\n\n"]
    sequences = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    geometry = smol_model.adapter.geometry(smol_model.model)
    prober = _prober(geometry.d_model)
    result = attribute_sequences(
        smol_model.model, sequences, prober, geometry.n_layers - 1, True, pad_token_id=tokenizer.pad_token_id
    )
    assert result.contribution.shape == (2, 30, 9)
    torch.testing.assert_close(result.exact_total(), result.logit, rtol=1e-3, atol=1e-3)
    logits = prober_logits(smol_model.model, sequences, prober, geometry.n_layers - 1, tokenizer.pad_token_id)
    torch.testing.assert_close(logits, result.logit, rtol=1e-4, atol=1e-4)

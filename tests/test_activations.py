"""Activation capture: layer definition, padding independence, early stop, order, shards."""

from __future__ import annotations

import pytest
import torch

from refusal_cliff.compute.activations import (
    forward_batch,
    iter_activation_batches,
    iter_activations,
    last_token_activations,
    read_activation_shards,
    write_activation_shards,
)
from refusal_cliff.core.architectures import get_adapter
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.hooks import add_hooks

from conftest import ARCHITECTURES, make_tiny_model

LENGTHS = (5, 17, 9, 1, 12, 3)


def random_sequences(lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 5000, (n,), generator=generator).tolist() for n in lengths]


def reference_hidden_states(model, sequence: list[int]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(torch.tensor([sequence]), output_hidden_states=True).hidden_states


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_capture_equals_output_hidden_states(architecture):
    """Layer k = output_hidden_states[k + 1]; the last layer includes the final norm (= [-1])."""
    model = make_tiny_model(architecture)
    adapter = get_adapter(model)
    sequences = random_sequences()
    captured = dict(iter_activations(model, adapter, sequences, [0, 1], "all", batch_size=4))
    for index, sequence in enumerate(sequences):
        hidden_states = reference_hidden_states(model, sequence)
        assert len(hidden_states) == 3
        torch.testing.assert_close(captured[index][0], hidden_states[1][0], atol=1e-5, rtol=1e-5)  # middle
        torch.testing.assert_close(captured[index][1], hidden_states[-1][0], atol=1e-5, rtol=1e-5)  # last


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_batched_equals_one_at_a_time(architecture):
    model = make_tiny_model(architecture)
    adapter = get_adapter(model)
    sequences = random_sequences()
    batched = dict(iter_activations(model, adapter, sequences, [0, 1], "all", batch_size=len(sequences)))
    for index, sequence in enumerate(sequences):
        alone = forward_batch(model, adapter, [sequence], [0, 1], "all")
        for layer in (0, 1):
            assert batched[index][layer].shape == (len(sequence), 64)
            torch.testing.assert_close(batched[index][layer], alone[layer][0], atol=1e-5, rtol=1e-5)


def test_last_position_is_each_sequences_last_token():
    model = make_tiny_model("LlamaForCausalLM")
    adapter = get_adapter(model)
    sequences = random_sequences()
    last = last_token_activations(model, adapter, sequences, [0, 1], batch_size=3)
    assert last[1].shape == (len(sequences), 64) and last[1].dtype == torch.float32
    for index, sequence in enumerate(sequences):
        hidden_states = reference_hidden_states(model, sequence)
        torch.testing.assert_close(last[0][index], hidden_states[1][0, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(last[1][index], hidden_states[-1][0, -1], atol=1e-5, rtol=1e-5)


def test_forward_stops_after_deepest_layer_and_never_runs_lm_head():
    model = make_tiny_model("LlamaForCausalLM")
    adapter = get_adapter(model)
    ran = []
    spies = [
        (adapter.layers(model)[0], lambda *_: ran.append("layer0")),
        (adapter.layers(model)[1], lambda *_: ran.append("layer1")),
        (adapter.final_norm(model), lambda *_: ran.append("norm")),
        (model.lm_head, lambda *_: ran.append("lm_head")),
    ]
    with add_hooks(forward_hooks=spies):
        forward_batch(model, adapter, random_sequences(), [0], "last")
        assert ran == ["layer0"]
        ran.clear()
        forward_batch(model, adapter, random_sequences(), [1], "last")
        assert ran == ["layer0", "layer1", "norm"]
    # no hook is left behind
    assert not adapter.layers(model)[0]._forward_hooks


def test_several_layers_in_one_pass():
    model = make_tiny_model("Qwen2ForCausalLM")
    adapter = get_adapter(model)
    passes = []
    with add_hooks(forward_hooks=[(adapter.embed_tokens(model), lambda *_: passes.append(1))]):
        batches = list(
            iter_activation_batches(model, adapter, random_sequences(), [0, 1], "last", batch_size=3)
        )
    assert len(passes) == len(batches) == 2
    assert all(set(batch.values) == {0, 1} for batch in batches)


def test_results_in_input_order_and_sorted_batches():
    model = make_tiny_model("LlamaForCausalLM")
    adapter = get_adapter(model)
    sequences = random_sequences()
    batches = list(
        iter_activation_batches(model, adapter, sequences, [1], "all", batch_size=2, sort_window=4)
    )
    # within each window of 4 sequences, batches go longest first
    assert batches[0].indices == [1, 2]
    assert sorted(i for b in batches for i in b.indices) == list(range(len(sequences)))
    ordered = list(iter_activations(model, adapter, sequences, [1], "all", batch_size=2, sort_window=4))
    assert [index for index, _ in ordered] == list(range(len(sequences)))
    assert [values[1].shape[0] for _, values in ordered] == list(LENGTHS)


def test_transform_is_applied_inside_the_hook():
    model = make_tiny_model("LlamaForCausalLM")
    adapter = get_adapter(model)
    sequences = random_sequences()
    plain = dict(iter_activations(model, adapter, sequences, [1], "all", batch_size=3))
    summed = dict(
        iter_activations(
            model,
            adapter,
            sequences,
            [1],
            "all",
            batch_size=3,
            transforms={1: lambda h: h.sum(-1, keepdim=True)},
        )
    )
    for index in range(len(sequences)):
        torch.testing.assert_close(summed[index][1][:, 0], plain[index][1].sum(-1), atol=1e-4, rtol=1e-5)


def test_shards_round_trip(tmp_path):
    model = make_tiny_model("LlamaForCausalLM")
    adapter = get_adapter(model)
    sequences = random_sequences()
    paths = write_activation_shards(tmp_path, model, adapter, sequences, [0, 1], batch_size=2, shard_size=4)
    assert [p.name for p in paths] == ["activations-00000.safetensors", "activations-00001.safetensors"]
    read = read_activation_shards(tmp_path)
    expected = last_token_activations(model, adapter, sequences, [0, 1], batch_size=6)
    for layer in (0, 1):
        torch.testing.assert_close(read[layer], expected[layer], atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_user_errors():
    model = make_tiny_model("LlamaForCausalLM")
    adapter = get_adapter(model)
    with pytest.raises(UserError, match="layer 2 does not exist"):
        last_token_activations(model, adapter, [[5, 6]], [2])
    with pytest.raises(UserError, match="sequence 1 is empty"):
        last_token_activations(model, adapter, [[5, 6], []], [0])
    with pytest.raises(UserError, match="positions"):
        forward_batch(model, adapter, [[5, 6]], [0], "first")


@pytest.mark.slow
def test_smol_middle_and_last_layer_padding_independent(smol_model):
    """The real model (sdpa attention, 30 layers): middle and last layer equal output_hidden_states,
    and batching does not change them."""
    model, adapter = smol_model.model, smol_model.adapter
    sequences = random_sequences((7, 30, 2), seed=1)
    batched = dict(iter_activations(model, adapter, sequences, [14, 29], "all", batch_size=3))
    for index, sequence in enumerate(sequences):
        hidden_states = reference_hidden_states(model, sequence)
        alone = forward_batch(model, adapter, [sequence], [14, 29], "all")
        torch.testing.assert_close(alone[14][0], hidden_states[15][0], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(alone[29][0], hidden_states[-1][0], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(batched[index][29], alone[29][0], atol=1e-3, rtol=1e-4)

import pytest
import torch

from refusal_cliff.core.architectures import get_adapter, supported_architectures
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.hooks import add_hooks

from conftest import ARCHITECTURES, make_tiny_model


def test_every_registered_adapter_is_tested():
    # both ways: every tested family is registered, and every registered adapter is tested
    assert set(ARCHITECTURES) == set(supported_architectures())


def test_adapter_finds_layers_o_proj_and_geometry(tiny_model):
    adapter = get_adapter(tiny_model)
    adapter.check(tiny_model)
    geometry = adapter.geometry(tiny_model)
    assert (
        geometry.n_layers,
        geometry.n_heads,
        geometry.n_kv_heads,
        geometry.head_dim,
        geometry.d_model,
    ) == (2, 4, 2, 16, 64)
    assert len(adapter.layers(tiny_model)) == 2
    for layer in range(2):
        o_proj = adapter.o_proj(tiny_model, layer)
        assert o_proj.in_features == geometry.n_heads * geometry.head_dim
        assert o_proj.out_features == geometry.d_model
    assert adapter.final_norm(tiny_model) is not None
    assert adapter.mlp(tiny_model, 1) is not None
    if adapter.post_attention_norm_attr:
        assert getattr(adapter.layers(tiny_model)[0], adapter.post_attention_norm_attr) is not None


def test_o_proj_is_on_the_forward_path(tiny_model):
    """Zeroing the o_proj input through the adapter's module must change the logits."""
    adapter = get_adapter(tiny_model)
    ids = torch.tensor([[5, 17, 99, 3]])
    base = tiny_model(ids).logits

    def zero(module, args):
        return (torch.zeros_like(args[0]),)

    with add_hooks(forward_pre_hooks=[(adapter.o_proj(tiny_model, layer), zero) for layer in range(2)]):
        ablated = tiny_model(ids).logits
    assert not torch.allclose(base, ablated)
    assert torch.allclose(tiny_model(ids).logits, base)  # hooks removed


def test_unknown_architecture_lists_supported():
    model = make_tiny_model("LlamaForCausalLM")
    model.config.architectures = ["MambaForCausalLM"]
    with pytest.raises(UserError) as info:
        get_adapter(model)
    message = str(info.value)
    assert "MambaForCausalLM" in message and "LlamaForCausalLM" in message and "\n" not in message


def test_hooks_removed_after_an_exception():
    model = make_tiny_model("LlamaForCausalLM")
    module = get_adapter(model).o_proj(model, 0)
    with pytest.raises(RuntimeError):
        with add_hooks(forward_pre_hooks=[(module, lambda m, a: None)]):
            raise RuntimeError("boom")
    assert not module._forward_pre_hooks


def test_hook_target_must_be_a_module():
    with pytest.raises(ValueError):
        with add_hooks(forward_hooks=[(None, lambda *a: None)]):
            pass

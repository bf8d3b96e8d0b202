"""CUDA correctness in bf16 and fp16 on tiny random models (issue 9): the identities, then the pipeline.

Skipped without CUDA. `REFUSAL_CLIFF_TEST_DEVICE=cpu` runs the same tests on the CPU's bf16/fp16
kernels (a check of the tests themselves, not of CUDA). `REFUSAL_CLIFF_TEST_TOKENIZER=DIR` names a
saved tokenizer folder, for a GPU host without the embedded model.

Tolerances. Every identity here holds exactly in real arithmetic; in a half dtype the model rounds
each tensor it materialises (a matmul output, a residual addition, a norm output) once, to a relative
error of at most u = 2^-8 (bf16) or 2^-11 (fp16), while our decompositions are computed in float32
from the tensors the model really holds. So each bound below adds up u × |what was rounded| along
the path from the terms to the logit, with the sizes measured on the same forward pass, and allows
nothing else (plus 1e-5 for float32 summation). For that to be a bound, every matmul must accumulate
in float32 and round once: the `_fp32_accumulation` fixture turns off cuBLAS's reduced-precision
reductions for these tests (the toolkit itself leaves PyTorch's defaults alone).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from refusal_cliff.compute.ablation import fold_head_scaling, scale_heads
from refusal_cliff.compute.attribution import attribute_batch, head_vectors
from refusal_cliff.core.architectures import get_adapter
from refusal_cliff.core.hooks import add_hooks

from conftest import CORE, CORE_IDS, make_tiny_model

DEVICE = os.environ.get("REFUSAL_CLIFF_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
VOCAB = 1024
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
HEADS = [(0, 1), (1, 0), (1, 3)]


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2  # bf16: 2^-8, fp16: 2^-11


@pytest.fixture(autouse=True)
def _fp32_accumulation():
    matmul = torch.backends.cuda.matmul
    saved = (matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction)
    matmul.allow_fp16_reduced_precision_reduction = False
    matmul.allow_bf16_reduced_precision_reduction = False
    yield
    matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction = saved


@pytest.fixture(scope="module")
def tokenizer(request):
    folder = os.environ.get("REFUSAL_CLIFF_TEST_TOKENIZER")
    if folder:
        from transformers import AutoTokenizer

        loaded = AutoTokenizer.from_pretrained(folder)
        loaded.padding_side = "left"
        return loaded
    return request.getfixturevalue("smol_tokenizer")


def _model(architecture: str, overrides: dict, dtype: torch.dtype, n_layers: int = 2):
    model = make_tiny_model(architecture, vocab_size=VOCAB, num_hidden_layers=n_layers, **overrides)
    adapter = get_adapter(model)
    with torch.no_grad():  # a visible o_proj bias where the family has one
        for index in range(n_layers):
            if adapter.o_proj(model, index).bias is not None:
                adapter.o_proj(model, index).bias.normal_(0, 0.5)
    return model.to(device=DEVICE, dtype=dtype)


def _batch():
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, VOCAB, (3, 11), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # left padding
    attention_mask[2, :7] = 0
    return input_ids.to(DEVICE), attention_mask.to(DEVICE)


def _capture_last(model, input_ids, attention_mask):
    """The half tensors the forward pass materialises, at the last position, upcast to float32:
    `embedding` [b, d]; per layer `z` (o_proj input), `attention` (o_proj output), `middle` (the
    residual stream after the attention add), `mlp` (the MLP output), `hidden` (the layer output)."""
    from refusal_cliff.compute.attribution import position_ids_for

    adapter = get_adapter(model)
    n_layers = adapter.geometry(model).n_layers
    seen: dict = {}

    def keep(key):
        def hook(module, args, output):
            value = output[0] if isinstance(output, tuple) else output
            seen[key] = value[:, -1].float()
            if key[0] == "attention":
                seen[("z", key[1])] = args[0][:, -1].float()

        return hook

    def keep_input(key):
        def hook(module, args):
            seen[key] = args[0][:, -1].float()

        return hook

    hooks = [(adapter.embed_tokens(model), keep(("embedding",)))]
    hooks += [(adapter.o_proj(model, i), keep(("attention", i))) for i in range(n_layers)]
    hooks += [(adapter.mlp(model, i), keep(("mlp", i))) for i in range(n_layers)]
    hooks += [(adapter.layers(model)[i], keep(("hidden", i))) for i in range(n_layers)]
    pre_hooks = [
        (block.post_attention_layernorm, keep_input(("middle", i)))
        for i, block in enumerate(adapter.layers(model))
    ]
    with torch.no_grad(), add_hooks(forward_pre_hooks=pre_hooks, forward_hooks=hooks):
        model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_for(attention_mask)
        )
    return seen


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("architecture,overrides", CORE, ids=CORE_IDS)
def test_head_vectors_sum_to_the_o_proj_output(architecture, overrides, dtype):
    model = _model(architecture, overrides, dtype)
    seen = _capture_last(model, *_batch())
    u = unit_roundoff(dtype)
    adapter = get_adapter(model)
    for index in range(2):
        o_proj = adapter.o_proj(model, index)
        bias = (
            o_proj.bias.float()
            if o_proj.bias is not None
            else torch.zeros(o_proj.out_features, device=DEVICE)
        )
        total = head_vectors(o_proj, seen[("z", index)], 4).sum(1) + bias
        output = seen[("attention", index)]
        # o = round(z W^T + b): one rounding of the product, one of the bias addition
        bound = 2 * u * (output.abs() + bias.abs()) + 1e-5
        assert torch.all((total - output).abs() <= bound), float(((total - output).abs() - bound).max())


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("architecture,overrides", CORE, ids=CORE_IDS)
@pytest.mark.parametrize("where", ["last-layer-final-norm", "middle-layer"])
def test_exact_decomposition_sums_to_the_logit(architecture, overrides, dtype, where):
    """In a half dtype the terms do not sum to the logit: the model rounded its residual stream. Here
    every rounding it made is measured on the same pass (each materialised tensor minus the float32
    sum of its inputs) and added back; then terms and logit must agree to float32 precision (1e-5; the
    CPU measured ≤ 3e-7 where the unaccounted gap is up to 8e-3 in bf16), so any misread position,
    bias, norm scale or head breaks it."""
    model = _model(architecture, overrides, dtype, n_layers=3)
    layer, final_norm_applied = (2, True) if where == "last-layer-final-norm" else (1, False)
    torch.manual_seed(1)
    prober = torch.nn.Linear(64, 1).to(DEVICE)
    input_ids, attention_mask = _batch()
    result = attribute_batch(model, input_ids, attention_mask, prober, layer, final_norm_applied)
    assert torch.isfinite(result.logit).all() and result.exact[:, : layer + 1].abs().sum() > 0

    seen = _capture_last(model, input_ids, attention_mask)
    adapter = get_adapter(model)
    weight = prober.weight.detach().float()[0]
    rounding = torch.zeros_like(seen[("embedding",)])  # Σ terms - h_layer, in the residual stream
    previous = seen[("embedding",)]
    for index in range(layer + 1):
        o_proj = adapter.o_proj(model, index)
        heads = head_vectors(o_proj, seen[("z", index)], 4).sum(1)
        if o_proj.bias is not None:
            heads = heads + o_proj.bias.float()
        attention, middle = seen[("attention", index)], seen[("middle", index)]
        mlp, hidden = seen[("mlp", index)], seen[("hidden", index)]
        rounding += heads - attention  # the o_proj output's rounding
        rounding -= middle - (previous + attention)  # the attention residual add's
        rounding -= hidden - (middle + mlp)  # the MLP residual add's
        previous = hidden
    if final_norm_applied:  # the prober reads w · g ⊙ h / rms(h); the model's norm rounds its output
        from refusal_cliff.compute.attribution import _norm_eps, _norm_gain, _rms

        norm = adapter.final_norm(model)
        read = weight * _norm_gain(norm, 64, previous.device) / _rms(previous, _norm_eps(norm))
        normed = norm(previous.to(dtype)).float()
        expected = (read * rounding).sum(-1) + (read * previous).sum(-1) - normed @ weight
    else:
        expected = rounding @ weight
    gap = result.exact_total() - result.logit
    torch.testing.assert_close(gap, expected.cpu(), rtol=0, atol=1e-5)
    assert gap.abs().max() > 1e-6 or dtype == torch.float32  # half precision really did round


def _logits(model, input_ids, attention_mask) -> torch.Tensor:
    from refusal_cliff.compute.attribution import position_ids_for

    with torch.no_grad():
        return model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_for(attention_mask)
        ).logits.float()


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("architecture,overrides", CORE, ids=CORE_IDS)
@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_folding_equals_the_hook(architecture, overrides, dtype, gamma):
    """γ = 0 and γ = 0.5 scale exactly in any binary float, so the hooked (γ·z)·W and the folded
    z·(γ·W) are the same products; only a kernel's summation order may differ: one rounding."""
    model = _model(architecture, overrides, dtype)
    input_ids, attention_mask = _batch()
    real = attention_mask.bool()
    before = _logits(model, input_ids, attention_mask)
    with scale_heads(model, HEADS, gamma=gamma):
        hooked = _logits(model, input_ids, attention_mask)
    assert not torch.equal(hooked[real], before[real])
    fold_head_scaling(model, HEADS, gamma=gamma)
    folded = _logits(model, input_ids, attention_mask)
    bound = unit_roundoff(dtype) * hooked[real].abs() + 1e-5
    assert torch.all((folded[real] - hooked[real]).abs() <= bound)


# -- the whole pipeline, through the CLI -----------------------------------------------------------------


def _invoke(*args):
    result = CliRunner().invoke(_main(), [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _main():
    from refusal_cliff.cli import main

    return main


def _prompts(path: Path, kind: str, n: int) -> Path:
    path.write_text(
        "".join(json.dumps({"id": f"{kind}-{i}", "prompt": f"{kind} request {i}"}) + "\n" for i in range(n))
    )
    return path


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_generate_probe_trace_heads_ablate_export_select(dtype, tokenizer, tmp_path):
    from refusal_cliff.core.models import load_model
    from refusal_cliff.core.runs import read_jsonl

    folder = tmp_path / "model"
    model = make_tiny_model("LlamaForCausalLM")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    common = ["--model", folder, "--device", DEVICE, "--dtype", dtype]
    budget = ["--max-thinking-tokens", 12, "--max-answer-tokens", 4, "--batch-size", 4]
    for kind in ("harmful", "harmless"):
        prompts = _prompts(tmp_path / f"{kind}.jsonl", kind, 12)
        out = tmp_path / kind
        _invoke("generate", *common, "--prompts", prompts, *budget, "--out", out)
        metadata = json.loads((out / "metadata.json").read_text())
        assert metadata["config"]["dtype"].endswith(dtype) and (metadata["accelerator"] == "cpu") == (
            DEVICE == "cpu"
        )
        _invoke("label", "--generations", out / "generations.jsonl", "--out", out)
    labels = read_jsonl(tmp_path / "harmful" / "labels.jsonl")  # a random model never refuses
    for index, label in enumerate(labels):
        label["refusal"] = index % 3 != 0
    (tmp_path / "harmful" / "labels.jsonl").write_text("".join(json.dumps(label) + "\n" for label in labels))

    probe = tmp_path / "probe"
    _invoke("probe", "train", *common, "--harmful", tmp_path / "harmful", "--harmless", tmp_path / "harmless",
            "--epochs", 3, "--out", probe)  # fmt: skip
    prober = probe / "prober.safetensors"
    generations = tmp_path / "harmful" / "generations.jsonl"
    _invoke("trace", *common, "--prober", prober, "--generations", generations, "--out", tmp_path / "trace")
    cliff = read_jsonl(tmp_path / "trace" / "cliff.jsonl")
    assert [row["id"] for row in cliff] == [label["id"] for label in labels]
    assert all(0.0 <= row["final"] <= 1.0 for row in cliff)

    _invoke("heads", *common, "--prober", prober, "--generations", generations, "--out", tmp_path / "heads")
    heads = json.loads((tmp_path / "heads" / "heads.json").read_text())
    assert len(heads) == 8 and all(torch.isfinite(torch.tensor(h["contribution"])) for h in heads)

    export = tmp_path / "repaired"
    _invoke("ablate", *common, "--prober", prober, "--heads", tmp_path / "heads" / "heads.json",
            "--thresholds", "0.25", "--prompts", tmp_path / "harmful.jsonl", "--limit", 4,
            "--max-thinking-tokens", 6, "--max-answer-tokens", 3, "--export", export,
            "--out", tmp_path / "ablation")  # fmt: skip
    records = json.loads((tmp_path / "ablation" / "ablation.json").read_text())
    ablated = [tuple(h) for h in records[-1]["heads"]]
    assert len(ablated) == 2
    # the exported checkpoint is the hooked model (γ = 0: exact), in this dtype on this device
    original = load_model(str(folder), device=DEVICE, dtype=dtype)
    repaired = load_model(str(export), device=DEVICE, dtype=dtype)
    assert next(repaired.model.parameters()).dtype == DTYPES["bf16" if dtype == "bfloat16" else "fp16"]
    input_ids, attention_mask = _batch()
    with scale_heads(original, ablated, gamma=0.0):
        hooked = _logits(original.model, input_ids, attention_mask)
    real = attention_mask.bool()
    exported = _logits(repaired.model, input_ids, attention_mask)
    u = unit_roundoff(next(repaired.model.parameters()).dtype)
    assert torch.all((exported[real] - hooked[real]).abs() <= u * hooked[real].abs() + 1e-5)

    candidates = tmp_path / "candidates.jsonl"
    candidates.write_text(
        "".join(
            json.dumps({"id": f"c{i}", "prompt": f"candidate {i}", "response": "I cannot help with that."})
            + "\n"
            for i in range(6)
        )
    )
    _invoke("select", *common, "--prober", prober, "--candidates", candidates, "--k", 3,
            "--max-thinking-tokens", 8, "--max-answer-tokens", 4, "--out", tmp_path / "select")  # fmt: skip
    scores = read_jsonl(tmp_path / "select" / "scores.jsonl")
    assert [row["id"] for row in scores] == [f"c{i}" for i in range(6)]
    assert len(read_jsonl(tmp_path / "select" / "selection.jsonl")) == 3


@pytest.mark.train
@pytest.mark.skipif(DEVICE == "cpu", reason="finetune trains in bf16/fp16 on GPUs only (fp32 on CPU)")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_finetune_mixed_precision(precision, lora, tokenizer, tmp_path):
    """`finetune` in the paper's setting on a GPU: fp32 master weights, bf16/fp16 compute (fp16 with
    loss scaling), the model saved whole and loadable, its weights moved."""
    pytest.importorskip("trl", reason="needs the `train` extra")
    from safetensors.torch import load_file

    from refusal_cliff.core.models import load_model

    folder = tmp_path / "model"
    make_tiny_model("LlamaForCausalLM").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    prompt = "<|im_start|>user\nHow do I pick a lock?<|im_end|>\n<|im_start|>assistant\n"
    completion = "<think>\nThis is about breaking in.\n</think>\n\nI can't help with that.<|im_end|>"
    data = tmp_path / "selection.jsonl"
    rows = [{"id": str(i), "sft_prompt": prompt, "sft_completion": completion} for i in range(4)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "ft"
    extra = ["--lora"] if lora else []
    _invoke("finetune", "--model", folder, "--device", DEVICE, "--data", data, "--precision", precision,
            "--lr", "1e-3", "--grad-accum", 1, "--max-steps", 2, "--max-length", 128, *extra, "--out", out)  # fmt: skip
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["steps"] == 2 and math.isfinite(metrics["train_loss"])
    before, after = load_file(folder / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert any(not torch.equal(before[name], after[name].to(before[name].dtype)) for name in before)
    if not lora:  # full-parameter: the bf16-loaded model trained on float32 master weights, saved as such
        assert {tensor.dtype for tensor in after.values()} == {torch.float32}
    reloaded = load_model(str(out / "model"), device=DEVICE, dtype="float32")
    assert all(torch.isfinite(p).all() for p in reloaded.model.parameters())

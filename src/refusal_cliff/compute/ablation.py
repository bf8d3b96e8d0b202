"""Scale refusal suppression heads (paper §4.2): test the causal claim and export a repaired model.

The paper ablates a head by multiplying its attention output by γ (Eq. 5; γ=0 removes it,
γ>1 amplifies it). That output is exactly the head's slice of the `o_proj` input, so a forward
pre-hook on `o_proj` scales it without touching attention internals, for any forward or
`generate` call. An optional per-token renormalisation rescales the whole `o_proj` input back
to its original norm (Zhang et al. 2024, to avoid generation collapse).

Without renormalisation the same edit is linear in the weights: `W_O[:, slice_h] · (γ z_h) =
(γ W_O[:, slice_h]) · z_h`, so it folds into the `o_proj` weight columns and the repaired model
is an ordinary checkpoint that any inference engine serves. `evaluate_condition` measures one
scaling: the final refusal score, the attack success rate of regenerated answers and the refusal
rate on benign prompts. The `ablate` stage (`stages/ablate.py`) runs it per threshold of suppression
heads (paper Figure 8); `components` and `guard` scale heads with the same hooks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from refusal_cliff.compute.attribution import prober_logits
from refusal_cliff.compute.generation import generate_records
from refusal_cliff.compute.labeling import KeywordLabeler, is_attack_success, label_records
from refusal_cliff.core.architectures import ArchitectureAdapter, get_adapter
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.hooks import add_hooks
from refusal_cliff.core.runs import read_json
from refusal_cliff.core.templates import probing_tokens

logger = logging.getLogger(__name__)

Head = tuple[int, int]  # (layer, head)


def _model_and_adapter(loaded_or_model) -> tuple[nn.Module, ArchitectureAdapter]:
    model = getattr(loaded_or_model, "model", loaded_or_model)
    adapter = getattr(loaded_or_model, "adapter", None) or get_adapter(model)
    return model, adapter


def group_heads(
    model: nn.Module, adapter: ArchitectureAdapter, heads: Sequence[Sequence[int]]
) -> dict[int, list[int]]:
    """Validate (layer, head) pairs and group them by layer: {layer: sorted heads}."""
    geometry = adapter.geometry(model)
    by_layer: dict[int, set[int]] = {}
    for pair in heads:
        if len(pair) != 2:
            raise UserError(f"a head is a (layer, head) pair, got {pair!r}")
        layer, head = int(pair[0]), int(pair[1])
        if not 0 <= layer < geometry.n_layers or not 0 <= head < geometry.n_heads:
            raise UserError(
                f"head ({layer}, {head}) does not exist: the model has {geometry.n_layers} layers "
                f"of {geometry.n_heads} heads; use heads.json written for this model"
            )
        by_layer.setdefault(layer, set()).add(head)
    return {layer: sorted(found) for layer, found in sorted(by_layer.items())}


def _scaling_hook(
    head_indices: list[int], n_heads: int, head_dim: int, gamma: float, renormalize: bool, others: float = 1.0
):
    def hook(module: nn.Module, args: tuple):
        x = args[0]  # [batch, pos, n_heads * head_dim]
        per_head = x.reshape(*x.shape[:-1], n_heads, head_dim)  # [batch, pos, n_heads, head_dim]
        factor = torch.full((n_heads, 1), others, dtype=x.dtype, device=x.device)
        factor[head_indices] = gamma
        scaled = (per_head * factor).reshape(x.shape)
        if renormalize:
            original = x.float().norm(dim=-1, keepdim=True)  # [batch, pos, 1]
            new = scaled.float().norm(dim=-1, keepdim=True)
            scaled = (scaled.float() * (original / new.clamp_min(1e-12))).to(x.dtype)
        return (scaled, *args[1:])

    return hook


@contextmanager
def scale_heads(
    loaded_or_model,
    heads: Sequence[Sequence[int]],
    gamma: float = 0.0,
    renormalize: bool = False,
    boost_others: float | None = None,
) -> Iterator[None]:
    """Scale the chosen heads' slices of the `o_proj` input by γ inside the block.

    Usable around any forward or `generate` call:

        with scale_heads(loaded, [(20, 3), (24, 7)], gamma=0.0):
            records = list(generation.generate_records(loaded, prompts, config))

    Args:
        loaded_or_model: a `LoadedModel` or a causal LM of a registered architecture.
        heads: (layer, head) pairs.
        gamma: 0 removes the heads, 1 changes nothing, >1 amplifies them.
        renormalize: rescale each token's full `o_proj` input back to its original L2 norm.
        boost_others: the authors' boosting control: also scale every OTHER head of every layer by
            this factor (None or 1: the other heads are left alone).
    """
    model, adapter = _model_and_adapter(loaded_or_model)
    geometry = adapter.geometry(model)
    by_layer = group_heads(model, adapter, heads)
    others = 1.0 if boost_others is None else float(boost_others)
    if others != 1.0:  # every layer is touched: its other heads are boosted
        by_layer = {layer: by_layer.get(layer, []) for layer in range(geometry.n_layers)}
    hooks = [
        (
            adapter.o_proj(model, layer),
            _scaling_hook(indices, geometry.n_heads, geometry.head_dim, float(gamma), renormalize, others),
        )
        for layer, indices in by_layer.items()
    ]
    with add_hooks(forward_pre_hooks=hooks):
        yield


@torch.no_grad()
def fold_head_scaling(
    loaded_or_model,
    heads: Sequence[Sequence[int]],
    gamma: float,
    renormalize: bool = False,
    boost_others: float | None = None,
) -> None:
    """Multiply the `o_proj` weight columns of the chosen heads by γ, in place.

    Equivalent to `scale_heads(..., renormalize=False, boost_others=...)` for every input (with
    `boost_others`, every other head's columns are multiplied by it). Renormalisation depends on
    each token's activations and cannot be folded into weights.
    """
    if renormalize:
        raise UserError(
            "renormalisation depends on the activations and cannot be folded into weights; "
            "export without --renormalize, or use scale_heads at inference time"
        )
    model, adapter = _model_and_adapter(loaded_or_model)
    geometry = adapter.geometry(model)
    by_layer = group_heads(model, adapter, heads)
    others = 1.0 if boost_others is None else float(boost_others)
    if others != 1.0:  # as scale_heads: every layer is touched, its other heads are boosted
        by_layer = {layer: by_layer.get(layer, []) for layer in range(geometry.n_layers)}
    for layer, indices in by_layer.items():
        weight = adapter.o_proj(model, layer).weight  # [d_model, n_heads * head_dim]
        for head in range(geometry.n_heads):
            factor = gamma if head in indices else others
            if factor != 1.0:
                weight[:, head * geometry.head_dim : (head + 1) * geometry.head_dim] *= factor


@torch.no_grad()
def export_ablated_model(
    loaded,
    heads: Sequence[Sequence[int]],
    gamma: float,
    out_dir: str | Path,
    renormalize: bool = False,
    boost_others: float | None = None,
) -> Path:
    """Write a repaired checkpoint (`save_pretrained` + tokenizer) with the heads folded in
    (and, with `boost_others`, every other head scaled by it: see `fold_head_scaling`).

    The loaded model is left as it was: the touched columns are copied, folded, saved and
    restored, so no second copy of the model is needed. The result loads with plain
    `AutoModelForCausalLM.from_pretrained(out_dir)`.
    """
    if renormalize:
        fold_head_scaling(loaded, heads, gamma, renormalize=True)  # raises the explanatory error
    model, adapter = loaded.model, loaded.adapter
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} is not empty; choose a new folder for the exported model")
    by_layer = group_heads(model, adapter, heads)
    if boost_others is not None and float(boost_others) != 1.0:
        by_layer = dict.fromkeys(range(adapter.geometry(model).n_layers))
    saved = {layer: adapter.o_proj(model, layer).weight.detach().clone() for layer in by_layer}
    try:
        fold_head_scaling(loaded, heads, gamma, boost_others=boost_others)
        model.save_pretrained(str(out_dir))
    finally:
        for layer, weight in saved.items():
            adapter.o_proj(model, layer).weight.copy_(weight)
    loaded.tokenizer.save_pretrained(str(out_dir))
    logger.info("exported the model with %d heads scaled by %g to %s", len(heads), gamma, out_dir)
    return out_dir


def _final_scores(
    loaded, records: Sequence[dict], prober: nn.Linear, layer: int, batch_size: int
) -> torch.Tensor:
    """[n] refusal score (sigmoid of the prober logit) at the last token of each probing sequence."""
    sequences = [probing_tokens(loaded.tokenizer, record)[0] for record in records]
    logits = prober_logits(loaded.model, sequences, prober, layer, loaded.tokenizer.pad_token_id, batch_size)
    return torch.sigmoid(logits)


def _refusals(loaded, records: Sequence[dict], labeler, judge) -> list[dict]:
    return label_records(records, labeler, loaded.tokenizer, judge)


def evaluate_condition(
    loaded,
    prober: nn.Linear,
    layer: int,
    harmful_prompts: Sequence[dict],
    benign_prompts: Sequence[dict],
    generation_config,
    labeler=None,
    judge=None,
    progress: bool = False,
    bar=None,
    condition: str = "",
    backend=None,
) -> dict:
    """Generate, label and score under whatever ablation is active. Returns the metrics and records.

    `bar`: one overall tqdm bar advanced per generated example (its description names the condition).
    `backend`: the `generation.GenerationBackend` that writes the answers (default: HF on the hooked
    model); the final refusal scores always come from the loaded (hooked) model.
    """

    def generate(prompts: Sequence[dict], kind: str) -> list[dict]:
        if bar is None:
            return list(
                generate_records(loaded, list(prompts), generation_config, backend=backend, progress=progress)
            )
        bar.set_description(f"ablate {condition} {kind}")
        out = []
        for record in generate_records(
            loaded, list(prompts), generation_config, backend=backend, progress=False
        ):
            out.append(record)
            bar.update(1)
        return out

    labeler = labeler or KeywordLabeler()
    harmful = generate(harmful_prompts, "harmful")
    harmful_labels = _refusals(loaded, harmful, labeler, judge)
    scores = _final_scores(loaded, harmful, prober, layer, generation_config.batch_size)
    metrics = {
        "final_score_mean": float(scores.mean()) if len(scores) else None,
        "asr": sum(is_attack_success(label) for label in harmful_labels) / len(harmful) if harmful else None,
        "benign_refusal_rate": None,
        "n_harmful": len(harmful),
        "n_benign": len(benign_prompts),
    }
    benign = []
    if benign_prompts:
        benign = generate(benign_prompts, "benign")
        # over-refusal is a keyword judgement: the model judge rates harm, not refusals
        benign_labels = _refusals(loaded, benign, labeler, None)
        metrics["benign_refusal_rate"] = sum(label["refusal"] for label in benign_labels) / len(benign)
    for record, label, score in zip(harmful, harmful_labels, scores.tolist()):
        record.update(refusal=label["refusal"], attack_success=is_attack_success(label), final_score=score)
    return {"metrics": metrics, "harmful": harmful, "benign": benign}


def check_foldable(backend, renormalize: bool) -> None:
    """vLLM generates from folded weights, and renormalisation cannot be folded."""
    if renormalize and backend is not None and backend.backend == "vllm":
        raise UserError(
            "--backend vllm generates from a checkpoint with the heads folded into the weights, and "
            "--renormalize cannot be folded; drop --renormalize or use --backend hf"
        )


# -- the `ablate` stage --------------------------------------------------------------------


def read_ranking(path: str | Path) -> list[dict]:
    """Read heads.json (written by `heads`) and check its entries."""
    ranking = read_json(path)
    if (
        not isinstance(ranking, list)
        or not ranking
        or not all(isinstance(item, dict) and {"layer", "head", "rank"} <= set(item) for item in ranking)
    ):
        raise UserError(f"{path} is not a heads.json written by `refusal-cliff heads`")
    for index, item in enumerate(ranking):
        for key in ("layer", "head", "rank"):
            value = item[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(
                    f"{path}: entry {index} has {key} {value!r}, not a whole number of at least 0; the file is "
                    "damaged or edited: re-run `refusal-cliff heads`"
                )
    return ranking

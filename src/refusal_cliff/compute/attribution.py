"""Per-head contributions to the refusal prober at t_cliff (paper §4.1) and the exact logit decomposition.

The paper finds "refusal suppression heads" by asking, for every attention head, how much the
vector that head alone writes into the residual stream at t_cliff moves the prober:
`s = w·Δh + b` with `Δh = W_O[:, slice_h] · z` and `z` the head's slice of the `o_proj` input.
Because `o_proj` is linear, every head's `Δh` comes out of ONE forward pass: forward pre-hooks
capture each layer's `o_proj` input at t_cliff and each head's slice is projected through its
own columns of `W_O` afterwards. Re-running the model once per head (the naive way) is never
needed; `bench/bench_attribution.py` measures the difference.

The paper's score ignores everything between the head and the prober (later norms, the other
components). The *exact* decomposition does not: with every RMSNorm's per-token scale frozen at
its value for that token (`x / rms(x) * g`, rms held fixed), the prober's logit is linear in the
residual stream `x_k = embeddings + Σ_i attention_i + Σ_i mlp_i` (layers i ≤ k), so it splits into
one term per head, per `o_proj` bias, per MLP and for the embeddings, and the terms plus the
prober bias add up to the logit exactly (tests check it to float tolerance). Gemma 2/3 pass the
attention output through `post_attention_layernorm` (and the MLP output through
`post_feedforward_layernorm`) before adding it: the head terms then also go through that norm's
frozen scale, and the MLP term is read after its post-norm.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from refusal_cliff.compute.activations import last_token_activations, pad_left
from refusal_cliff.compute.executors import ShardJob, read_tensor_shard, write_tensor_shard
from refusal_cliff.core.architectures import ArchitectureAdapter, get_adapter
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.hooks import StopForward, add_hooks
from refusal_cliff.core.templates import probing_tokens

DEFAULT_THRESHOLDS = (0.01, 0.03, 0.10)


# -- results -------------------------------------------------------------------------------


@dataclass
class HeadAttribution:
    """Head contributions for a batch of examples at t_cliff.

    Attributes:
        contribution: [batch, n_layers, n_heads] paper form `w·Δh + b` (every layer).
        exact: [batch, n_layers, n_heads] each head's term in the exact decomposition of the
            prober logit (0 for layers after the prober's layer: they cannot reach it).
        o_proj_bias: [batch, n_layers] term of each layer's `o_proj` bias (0 when it has none).
        mlp: [batch, n_layers] term of each layer's MLP output.
        embedding: [batch] term of the token embedding.
        prober_bias: the prober's bias b.
        logit: [batch] the prober's logit on the model's actual hidden state at t_cliff.
    """

    contribution: torch.Tensor
    exact: torch.Tensor
    o_proj_bias: torch.Tensor
    mlp: torch.Tensor
    embedding: torch.Tensor
    prober_bias: float
    logit: torch.Tensor

    def exact_total(self) -> torch.Tensor:
        """[batch] sum of every term of the exact decomposition plus b (equals `logit`)."""
        return (
            self.exact.sum(dim=(1, 2))
            + self.o_proj_bias.sum(dim=1)
            + self.mlp.sum(dim=1)
            + self.embedding
            + self.prober_bias
        )

    @staticmethod
    def concatenate(parts: Sequence[HeadAttribution]) -> HeadAttribution:
        if not parts:
            raise ValueError("nothing to concatenate")
        return HeadAttribution(
            contribution=torch.cat([p.contribution for p in parts]),
            exact=torch.cat([p.exact for p in parts]),
            o_proj_bias=torch.cat([p.o_proj_bias for p in parts]),
            mlp=torch.cat([p.mlp for p in parts]),
            embedding=torch.cat([p.embedding for p in parts]),
            prober_bias=parts[0].prober_bias,
            logit=torch.cat([p.logit for p in parts]),
        )


# -- helpers -------------------------------------------------------------------------------


def _adapter(model: nn.Module) -> ArchitectureAdapter:
    return get_adapter(model)


def _check_prober(model: nn.Module, prober: nn.Linear, layer: int) -> None:
    geometry = _adapter(model).geometry(model)
    if prober.in_features != geometry.d_model or prober.out_features != 1:
        raise UserError(
            f"prober takes {prober.in_features} inputs but the model's d_model is {geometry.d_model}; "
            "use a prober trained on this model"
        )
    if not 0 <= layer < geometry.n_layers:
        raise UserError(f"prober layer {layer} is outside the model's 0..{geometry.n_layers - 1} layers")


def _norm_eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        value = getattr(norm, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    raise UserError(
        f"cannot read the epsilon of {type(norm).__name__}; the exact decomposition needs RMSNorm"
    )


def _norm_gain(norm: nn.Module, d_model: int, device: torch.device) -> torch.Tensor:
    """[d_model] the per-channel gain g of an RMSNorm (`weight` for Llama, `1 + weight` for Gemma),
    read by applying the module to a row of ones so that each family's convention is respected."""
    eps = _norm_eps(norm)
    ones = torch.ones(1, d_model, dtype=torch.float32, device=device)
    return norm(ones).float()[0] * math.sqrt(1.0 + eps)


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """[batch, 1] root mean square of each row, as RMSNorm computes it (in float32)."""
    x = x.float()
    return torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq] positions starting at 0 on each row's first real token (as `generate` and
    `activations.pad_left` count them), so left padding changes no score."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _run_base(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    """One forward pass of the decoder without the LM head (hooks collect what they need)."""
    base = _adapter(model).base_model(model)
    kwargs = {"input_ids": input_ids, "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
        kwargs["position_ids"] = position_ids_for(attention_mask)
    try:
        base(**kwargs)
    except StopForward:
        pass


def head_vectors(o_proj: nn.Linear, z: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Δh of every head: [batch, n_heads, d_model] from z [batch, n_heads * head_dim].

    `Δh_h = W_O[:, slice_h] · z_h`: what head h alone writes into the residual stream
    (without the `o_proj` bias). Σ_h Δh_h + bias = o_proj(z).
    """
    batch, width = z.shape
    head_dim = width // n_heads
    weight = o_proj.weight.float().view(o_proj.out_features, n_heads, head_dim)  # [d, H, dh]
    return torch.einsum("bhe,dhe->bhd", z.float().view(batch, n_heads, head_dim), weight)


def _per_head_dot(direction: torch.Tensor, o_proj: nn.Linear, z: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[batch, n_heads] `direction_b · Δh_{b,h}` without materialising Δh.

    direction: [d_model] or [batch, d_model]; z: [batch, n_heads * head_dim].
    """
    read = direction.float() @ o_proj.weight.float()  # [(batch,) n_heads * head_dim]
    products = read * z.float()  # [batch, n_heads * head_dim]
    return products.view(z.shape[0], n_heads, -1).sum(-1)


# -- attribution ---------------------------------------------------------------------------


@torch.no_grad()
def attribute_batch(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    prober: nn.Linear,
    layer: int,
    final_norm_applied: bool,
    positions: torch.Tensor | None = None,
) -> HeadAttribution:
    """Attribute the prober's logit at t_cliff to every head, from one forward pass.

    Args:
        model: a causal LM of a registered architecture.
        input_ids, attention_mask: [batch, seq], LEFT padded.
        prober: `nn.Linear(d_model, 1)` reading layer `layer`'s output.
        layer: 0-based decoder layer the prober reads.
        final_norm_applied: the prober reads `final_norm(h)` (true iff `layer` is the last one).
        positions: [batch] index of t_cliff in each row (default -1: the last token, which with
            left padding is the end of every probing sequence); or [batch, n_positions] to
            decompose several tokens of each row from the same pass (`components` uses it for the
            end template): the result then has batch * n_positions rows, row b * n_positions + p
            for row b's position p, each with the norms' scales frozen at its own token.
    """
    adapter = _adapter(model)
    geometry = adapter.geometry(model)
    _check_prober(model, prober, layer)
    n_layers, n_heads, d_model = geometry.n_layers, geometry.n_heads, geometry.d_model
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device) if attention_mask is not None else None
    batch, seq = input_ids.shape
    if positions is None:
        positions = torch.full((batch,), seq - 1, dtype=torch.long)
    positions = (
        torch.as_tensor(positions, dtype=torch.long).to(device) % seq
    )  # [batch] or [batch, n_positions]
    rows = torch.arange(batch, device=device)
    if positions.dim() == 2:
        rows = rows[:, None].expand_as(positions)
    n_rows = positions.numel()  # one row of the result per (example, position)

    # families that normalise a sub-layer's output before the residual add (Gemma 2/3)
    post_norms = (adapter.post_attention_norm_attr, adapter.post_mlp_norm_attr)
    post_norms = post_norms if all(post_norms) else None
    layers = adapter.layers(model)
    captured: dict[tuple[str, int], torch.Tensor] = {}  # (kind, layer) -> [batch, width]

    def take(x: torch.Tensor) -> torch.Tensor:
        return x[rows, positions].detach().float().reshape(n_rows, x.shape[-1])

    def pre_hook(kind: str, index: int):
        def hook(module, args):
            captured[(kind, index)] = take(args[0])

        return hook

    def post_hook(kind: str, index: int, stop: bool = False):
        def hook(module, args, output):
            captured[(kind, index)] = take(_first(output))
            if stop:
                raise StopForward

        return hook

    pre_hooks, hooks = [], [(adapter.embed_tokens(model), post_hook("embedding", -1))]
    for index in range(n_layers):
        pre_hooks.append((adapter.o_proj(model, index), pre_hook("z", index)))
        if index > layer:
            continue
        block = layers[index]
        if post_norms:
            pre_hooks.append((getattr(block, post_norms[0]), pre_hook("attention_out", index)))
            hooks.append((getattr(block, post_norms[1]), post_hook("mlp", index)))
        else:
            hooks.append((adapter.mlp(model, index), post_hook("mlp", index)))
    # stop after the prober's layer only when no later o_proj input is still needed
    hooks.append((layers[layer], post_hook("hidden", layer, stop=layer == n_layers - 1)))
    with add_hooks(forward_pre_hooks=pre_hooks, forward_hooks=hooks):
        _run_base(model, input_ids, attention_mask)

    weight = prober.weight.detach().float().to(device)[0]  # [d_model]
    bias = float(prober.bias.detach().float()[0]) if prober.bias is not None else 0.0
    hidden = captured[("hidden", layer)]  # [batch, d_model]
    if final_norm_applied:
        final_norm = adapter.final_norm(model)
        read = weight * _norm_gain(final_norm, d_model, device) / _rms(hidden, _norm_eps(final_norm))
        normed = final_norm(hidden.to(next(final_norm.parameters()).dtype)).float()
        logit = normed @ weight + bias
    else:
        read = weight.expand(n_rows, d_model)  # [n_rows, d_model]
        logit = hidden @ weight + bias

    contribution = torch.zeros(n_rows, n_layers, n_heads, device=device)
    exact = torch.zeros(n_rows, n_layers, n_heads, device=device)
    o_proj_bias = torch.zeros(n_rows, n_layers, device=device)
    mlp = torch.zeros(n_rows, n_layers, device=device)
    for index in range(n_layers):
        o_proj = adapter.o_proj(model, index)
        z = captured[("z", index)]  # [batch, n_heads * head_dim]
        contribution[:, index] = _per_head_dot(weight, o_proj, z, n_heads) + bias
        if index > layer:
            continue
        head_read = read
        if post_norms:
            norm = getattr(layers[index], post_norms[0])
            scale = _norm_gain(norm, d_model, device) / _rms(
                captured[("attention_out", index)], _norm_eps(norm)
            )
            head_read = read * scale  # [batch, d_model]
        exact[:, index] = _per_head_dot(head_read, o_proj, z, n_heads)
        if o_proj.bias is not None:
            o_proj_bias[:, index] = head_read @ o_proj.bias.float()
        mlp[:, index] = (read * captured[("mlp", index)]).sum(-1)
    embedding = (read * captured[("embedding", -1)]).sum(-1)
    result = HeadAttribution(
        contribution=contribution.cpu(),
        exact=exact.cpu(),
        o_proj_bias=o_proj_bias.cpu(),
        mlp=mlp.cpu(),
        embedding=embedding.cpu(),
        prober_bias=bias,
        logit=logit.cpu(),
    )
    if not torch.isfinite(result.contribution).all() or not torch.isfinite(result.logit).all():
        raise FloatingPointError("non-finite head contributions; check the model's dtype and inputs")
    return result


def attribute_sequences(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    prober: nn.Linear,
    layer: int,
    final_norm_applied: bool,
    pad_token_id: int,
    positions: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> HeadAttribution:
    """Attribute many token sequences, `batch_size` at a time (one forward pass per batch).

    Args:
        sequences: token ids of each probing sequence.
        positions: absolute index of t_cliff in each sequence (default: its last token).
    """
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if positions is not None and len(positions) != len(sequences):
        raise UserError("give one t_cliff position per sequence")
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # less padding per batch
    parts: list[tuple[list[int], HeadAttribution]] = []
    starts = range(0, len(order), batch_size)
    if progress:
        starts = tqdm(starts, desc="attributing heads", unit="batch")
    for start in starts:
        chunk = order[start : start + batch_size]
        batch = [sequences[i] for i in chunk]
        input_ids, attention_mask, _ = pad_left(batch, pad_token_id)
        batch_positions = None
        if positions is not None:
            width = input_ids.shape[1]
            batch_positions = []
            for i in chunk:
                position = positions[i] % len(sequences[i])
                batch_positions.append(width - len(sequences[i]) + position)
            batch_positions = torch.tensor(batch_positions)
        parts.append(
            (
                chunk,
                attribute_batch(
                    model, input_ids, attention_mask, prober, layer, final_norm_applied, batch_positions
                ),
            )
        )
    merged = HeadAttribution.concatenate([part for _, part in parts])
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor([i for chunk, _ in parts for i in chunk])] = torch.arange(len(order))
    return HeadAttribution(
        contribution=merged.contribution[inverse],
        exact=merged.exact[inverse],
        o_proj_bias=merged.o_proj_bias[inverse],
        mlp=merged.mlp[inverse],
        embedding=merged.embedding[inverse],
        prober_bias=merged.prober_bias,
        logit=merged.logit[inverse],
    )


def attribute_records(
    loaded,
    records: Sequence[dict],
    prober: nn.Linear,
    layer: int,
    final_norm_applied: bool,
    batch_size: int = 8,
    positions: Sequence[int] | None = None,
    progress: bool = False,
) -> HeadAttribution:
    """Attribute generation records (`generations.jsonl` lines) at the end of their probing sequence."""
    sequences = [probing_tokens(loaded.tokenizer, record)[0] for record in records]
    return attribute_sequences(
        loaded.model,
        sequences,
        prober,
        layer,
        final_norm_applied,
        pad_token_id=loaded.tokenizer.pad_token_id,
        positions=positions,
        batch_size=batch_size,
        progress=progress,
    )


@torch.no_grad()
def prober_logits(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    prober: nn.Linear,
    layer: int,
    pad_token_id: int,
    batch_size: int = 8,
) -> torch.Tensor:
    """[n] the prober's logit at the last token of each sequence (the final score before sigmoid).

    Reads the hidden state as `activations` defines it (final norm applied iff `layer` is the
    last one) and runs under whatever hooks are active, so inside `ablation.scale_heads` it
    measures the ablated model.
    """
    _check_prober(model, prober, layer)
    hidden = last_token_activations(model, _adapter(model), sequences, layer, batch_size, pad_token_id)[layer]
    weight = prober.weight.detach().float()[0]  # [d_model]
    bias = float(prober.bias.detach().float()[0]) if prober.bias is not None else 0.0
    return hidden.float() @ weight + bias


# -- attention patterns of the suppression heads ------------------------------------------

PATTERN_TOP = 20  # source positions kept per head and example in patterns.json
PATTERN_REGIONS = ("prompt", "thinking", "end_template")


@contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Run the block with the attention implementation `name` (a built-in one or one registered in
    transformers' `AttentionInterface`), whatever the model was loaded with; restored afterwards."""
    config = getattr(model, "config", None)
    original = getattr(config, "_attn_implementation", None)
    switch = original not in (None, name)
    if switch:
        model.set_attn_implementation(name)
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(original)


def eager_attention(model: nn.Module) -> AbstractContextManager:
    """Run the block with the eager attention implementation (the only one that returns the weights)."""
    return attention_implementation(model, "eager")


@torch.no_grad()
def attention_patterns_batch(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    heads: Sequence[Sequence[int]],
    positions: torch.Tensor | None = None,
) -> dict[tuple[int, int], torch.Tensor]:
    """The attention weights of chosen heads from the query at t_cliff, from one forward pass.

    The layers run eagerly for this pass (`eager_attention`), so the weights are exactly what
    `output_attentions=True` returns for a model loaded with `attn_implementation="eager"`; the
    forward stops after the deepest chosen layer.

    Args:
        input_ids, attention_mask: [batch, seq], LEFT padded.
        heads: (layer, head) pairs.
        positions: [batch] query index of t_cliff in each row (default: the last token).

    Returns:
        {(layer, head): [batch, seq] float32 weights over the source positions (0 on padding)}.
    """
    adapter = _adapter(model)
    geometry = adapter.geometry(model)
    wanted: dict[int, list[int]] = {}
    for layer, head in heads:
        if not 0 <= int(layer) < geometry.n_layers or not 0 <= int(head) < geometry.n_heads:
            raise UserError(
                f"head ({layer}, {head}) does not exist in a model of {geometry.n_layers} layers of "
                f"{geometry.n_heads} heads"
            )
        wanted.setdefault(int(layer), []).append(int(head))
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device) if attention_mask is not None else None
    batch, seq = input_ids.shape
    if positions is None:
        positions = torch.full((batch,), seq - 1, dtype=torch.long)
    positions = torch.as_tensor(positions, dtype=torch.long).to(device) % seq
    rows = torch.arange(batch, device=device)
    deepest = max(wanted)
    captured: dict[tuple[int, int], torch.Tensor] = {}

    def hook_for(layer: int):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError(
                    f"{adapter.name} layer {layer} returned no attention weights in eager mode"
                )
            for head in wanted[layer]:
                captured[(layer, head)] = (
                    weights[rows, head, positions].detach().float().cpu()
                )  # [batch, seq]
            if layer == deepest:
                raise StopForward

        return hook

    hooks = [(adapter.attention(model, layer), hook_for(layer)) for layer in wanted]
    with eager_attention(model), add_hooks(forward_hooks=hooks):
        _run_base(model, input_ids, attention_mask)
    return {(int(layer), int(head)): captured[(int(layer), int(head))] for layer, head in heads}


def summarize_pattern(
    weights: Sequence[float], tokens: Sequence[str], regions: Sequence[str], top: int = PATTERN_TOP
) -> dict:
    """`{mass: {prompt, thinking, end_template}, top: [{position, token, region, weight}, ...]}` of one
    head's weights over one probing sequence (the `top` largest, largest first)."""
    weights = [float(w) for w in weights]
    mass = {region: 0.0 for region in PATTERN_REGIONS}
    for weight, region in zip(weights, regions):
        mass[region] = mass.get(region, 0.0) + weight
    order = sorted(range(len(weights)), key=lambda i: (-weights[i], i))[:top]
    return {
        "mass": mass,
        "top": [
            {"position": i, "token": tokens[i], "region": regions[i], "weight": weights[i]} for i in order
        ],
    }


def attention_patterns(
    loaded,
    records: Sequence[dict],
    heads: Sequence[Sequence[int]],
    batch_size: int = 8,
    top: int = PATTERN_TOP,
    heatmap_index: int = 0,
) -> dict:
    """The `patterns.json` structure for generation records: per example and head, the `top` source
    positions of the head's attention from t_cliff (the last token of the probing sequence) and its
    mass per region; plus the full weights over one example's tokens (`heatmap_index`).

    Returns:
        {"heads": [[layer, head], ...], "top": int, "examples": [{"id", "n_tokens", "heads": [{"layer",
        "head", "mass", "top"}]}], "mass_mean": [{"layer", "head", "prompt", "thinking", "end_template"}],
        "heatmap": {"id", "tokens", "regions", "weights": [[...] per head]}}
    """
    heads = [(int(layer), int(head)) for layer, head in heads]
    tokenised = [probing_tokens(loaded.tokenizer, record) for record in records]
    order = sorted(range(len(records)), key=lambda i: len(tokenised[i][0]))
    per_example: dict[int, dict[tuple[int, int], list[float]]] = {}
    pad = loaded.tokenizer.pad_token_id or 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        input_ids, attention_mask, _ = pad_left([tokenised[i][0] for i in chunk], pad)
        weights = attention_patterns_batch(loaded.model, input_ids, attention_mask, heads)
        width = input_ids.shape[1]
        for row, index in enumerate(chunk):
            length = len(tokenised[index][0])
            per_example[index] = {head: weights[head][row, width - length :].tolist() for head in heads}
    examples = []
    sums = {head: {region: 0.0 for region in PATTERN_REGIONS} for head in heads}
    heatmap = None
    for index, record in enumerate(records):
        ids, regions = tokenised[index]
        tokens = loaded.tokenizer.batch_decode([[t] for t in ids])
        entry = {"id": str(record["id"]), "n_tokens": len(ids), "heads": []}
        for head in heads:
            summary = summarize_pattern(per_example[index][head], tokens, regions, top)
            for region, value in summary["mass"].items():
                sums[head][region] = sums[head].get(region, 0.0) + value
            entry["heads"].append({"layer": head[0], "head": head[1], **summary})
        examples.append(entry)
        if index == heatmap_index:
            heatmap = {
                "id": str(record["id"]),
                "tokens": tokens,
                "regions": list(regions),
                "weights": [per_example[index][head] for head in heads],
            }
    n = max(len(records), 1)
    mass_mean = [
        {"layer": head[0], "head": head[1], **{region: value / n for region, value in sums[head].items()}}
        for head in heads
    ]
    return {
        "heads": [list(head) for head in heads],
        "top": top,
        "t_cliff": "last token of the probing sequence",
        "mass_mean": mass_mean,
        "examples": examples,
        "heatmap": heatmap,
    }


# -- aggregation and ranking ---------------------------------------------------------------


def rank_heads(attribution: HeadAttribution, rank_by: str = "contribution") -> list[dict]:
    """Mean contribution of every head over the examples, ranked most negative first.

    Returns a list of `{layer, head, contribution, contribution_exact, std, rank}` (docs/artifacts.md):
    `contribution` is the mean paper-form score, `contribution_exact` the mean exact term, `std`
    the (population) standard deviation of the paper-form score. Ties keep (layer, head) order.
    """
    if rank_by not in ("contribution", "exact"):
        raise UserError("rank by 'contribution' (paper form) or 'exact'")
    n_examples, n_layers, n_heads = attribution.contribution.shape
    if n_examples == 0:
        raise UserError("no examples to aggregate; pick another --group")
    mean = attribution.contribution.double().mean(0)  # [n_layers, n_heads]
    std = attribution.contribution.double().std(0, correction=0)
    exact = attribution.exact.double().mean(0)
    key = mean if rank_by == "contribution" else exact
    flat = key.flatten()
    order = sorted(range(flat.numel()), key=lambda i: (float(flat[i]), i))
    ranking = []
    for rank, index in enumerate(order):
        layer, head = divmod(index, n_heads)
        ranking.append(
            {
                "layer": layer,
                "head": head,
                "contribution": float(mean[layer, head]),
                "contribution_exact": float(exact[layer, head]),
                "std": float(std[layer, head]),
                "rank": rank,
            }
        )
    return ranking


def heads_at_threshold(
    ranking: Sequence[dict], fraction: float, n_total: int | None = None
) -> list[tuple[int, int]]:
    """The top `round(fraction * n_layers * n_heads)` heads (at least 1) of a ranking.

    Args:
        ranking: `rank_heads` output (or heads.json), any order; sorted by `rank` here.
        fraction: a fraction of all heads, in (0, 1].
        n_total: number of heads in the model (default: the ranking's length).
    """
    if not 0 < fraction <= 1:
        raise UserError(f"threshold {fraction} must be a fraction of all heads in (0, 1]")
    n_total = n_total or len(ranking)
    count = max(1, round(fraction * n_total))
    ordered = sorted(ranking, key=lambda item: item["rank"])
    return [(int(item["layer"]), int(item["head"])) for item in ordered[:count]]


def parse_thresholds(text: str | Iterable[float]) -> list[float]:
    """'0.01,0.03,0.1' -> [0.01, 0.03, 0.1] (sorted, each in (0, 1])."""
    try:
        parts = text.split(",") if isinstance(text, str) else list(text)
        values = [float(part) for part in parts if str(part).strip()]
    except ValueError:
        raise UserError(
            f"--thresholds must be comma-separated fractions such as 0.01,0.03,0.1, got {text!r}"
        ) from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise UserError(f"--thresholds must be fractions in (0, 1], got {text!r}")
    return sorted(set(values))


# -- plot ----------------------------------------------------------------------------------


def head_marks(
    ranking: Sequence[dict], thresholds: Sequence[float], n_total: int
) -> dict[tuple[int, int], str]:
    """{(layer, head): the smallest threshold that selects it}, for outlining heads in the heatmap."""
    marks = {}
    for fraction in sorted(thresholds, reverse=True):
        for layer, head in heads_at_threshold(ranking, fraction, n_total):
            marks[(layer, head)] = f"{fraction:g}"
    return marks


_HEAD_FIELDS = ("contribution", "exact", "o_proj_bias", "mlp", "embedding", "logit")


def _heads_compute(loaded, records, progress=False, *, prober, batch_size):
    attribution = attribute_records(
        loaded, records, prober.linear, prober.layer, prober.final_norm_applied, batch_size, progress=progress
    )
    return [
        (
            str(record["id"]),
            HeadAttribution(
                **{field: getattr(attribution, field)[i : i + 1] for field in _HEAD_FIELDS},
                prober_bias=attribution.prober_bias,
            ),
        )
        for i, record in enumerate(records)
    ]


def _heads_write(path: Path, results) -> None:
    merged = HeadAttribution.concatenate([attribution for _, attribution in results])
    tensors = {field: getattr(merged, field) for field in _HEAD_FIELDS}
    write_tensor_shard(path, tensors, [id_ for id_, _ in results], {"prober_bias": merged.prober_bias})


def _heads_read(path: Path) -> list:
    tensors, ids, metadata = read_tensor_shard(path)
    return [
        (
            id_,
            HeadAttribution(
                **{field: tensors[field][i : i + 1] for field in _HEAD_FIELDS},
                prober_bias=metadata["prober_bias"],
            ),
        )
        for i, id_ in enumerate(ids)
    ]


def heads_job(prober, batch_size: int) -> ShardJob:
    """`heads`' shards: `attribution.attribute_records` per shard, safetensors of every example's
    `HeadAttribution` rows; results are `(id, HeadAttribution of one example)`."""
    return ShardJob(
        "heads",
        partial(_heads_compute, prober=prober, batch_size=batch_size),
        _heads_write,
        _heads_read,
        lambda result: result[0],
        ".safetensors",
    )

"""Which components make the cliff: every head, `o_proj` bias, MLP and the embeddings (issue 12).

The paper attributes the refusal logit to attention heads only, at t_cliff only, and names the
MLPs as unexplored (§7). `attribution.attribute_batch` already splits the prober's logit exactly
into one term per head, per `o_proj` bias, per MLP and for the embeddings (every RMSNorm's scale
frozen at its token). This module applies that decomposition at every token of the thinking-end
template plus the last thinking token, from ONE forward pass per batch (the positions are
gathered by the same hooks), and asks two questions of it:

- at t_cliff (the last end-template token): each component's term, mean and std over the group;
- across the end template: each component's term at t_cliff minus its term at the last thinking
  token, each with its own token's frozen scales. Since the terms of a token sum to that token's
  logit, the changes sum to the logit change exactly: that is each component's share of the drop.
  The per-token steps (term at end-template token k minus term at token k-1) say where it pushes.

`components.json` (docs/artifacts.md) is written by the `components` verb, not by `heads`: it
needs the end-template positions and its own figures, it is asked of whichever layer's prober
shows the drop (the demo uses a middle layer, `heads` the last), and heads.json stays the ranking
that `ablate` reads.

The second half tests the answer causally: `scale_components` multiplies chosen MLP outputs (and
heads, for a like-for-like comparison) by γ with hooks, and `fold_component_scaling` folds the MLP
scale into its `down_proj` (into the post-feedforward norm's gain for Gemma, whose MLP output is
normalised before the residual add: scaling `down_proj` there would be undone by that norm).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from refusal_cliff.compute.ablation import evaluate_condition, fold_head_scaling, scale_heads
from refusal_cliff.compute.activations import pad_left
from refusal_cliff.compute.attribution import HeadAttribution, _norm_gain, attribute_batch
from refusal_cliff.compute.backends import backend_info, generation_backend
from refusal_cliff.compute.generation import prompts_digest
from refusal_cliff.compute.labeling import check_group, group_name
from refusal_cliff.compute.prober import warn_if_unreliable
from refusal_cliff.core.architectures import ArchitectureAdapter, get_adapter
from refusal_cliff.core.config import COMPONENT_SPEC_HELP, Config, GenerationConfig, option, parse_components
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.hooks import add_hooks
from refusal_cliff.core.runs import (
    JsonlWriter,
    RunFolder,
    file_digest,
    write_json,
)
from refusal_cliff.core.templates import REGION_END, probing_tokens
from refusal_cliff.report import plotting
from refusal_cliff.stages.ablate import AblateConfig

logger = logging.getLogger(__name__)

KINDS = ("embedding", "head", "o_proj_bias", "mlp")
CLASSES = {"head": "attention", "o_proj_bias": "attention bias", "mlp": "MLP", "embedding": "embeddings"}


# -- positions -----------------------------------------------------------------------------


def template_positions(regions: Sequence[str]) -> list[int]:
    """Indices of the last token before the end template (the last thinking token) and of every
    end-template token, in order; `regions` as `templates.probing_tokens` returns them."""
    end = [i for i, region in enumerate(regions) if region == REGION_END]
    if not end or end[0] == 0:
        raise ValueError("the probing sequence has no token before its end template")
    return [end[0] - 1, *end]


# -- the decomposition at several tokens ------------------------------------------------------


@dataclass
class ComponentTerms:
    """Every component's exact term at the last thinking token and each end-template token.

    Positions run along axis 1, aligned at the end: column 0 is always the last thinking token,
    column -1 t_cliff. An example whose end template has fewer tokens than the longest repeats
    its last thinking token in the leading columns (its steps there are 0), so every row's
    per-token steps still add up to its change.

    Attributes:
        head: [n, P, n_layers, n_heads]; o_proj_bias, mlp: [n, P, n_layers]; embedding: [n, P].
        logit: [n, P] the prober's logit on the model's hidden state at each token.
        prober_bias: b.
        n_end: [n] end-template tokens of each example.
    """

    head: torch.Tensor
    o_proj_bias: torch.Tensor
    mlp: torch.Tensor
    embedding: torch.Tensor
    logit: torch.Tensor
    prober_bias: float
    n_end: torch.Tensor

    def total(self) -> torch.Tensor:
        """[n, P] the sum of every term plus b (equals `logit`)."""
        return (
            self.head.sum((2, 3))
            + self.o_proj_bias.sum(2)
            + self.mlp.sum(2)
            + self.embedding
            + self.prober_bias
        )

    def flat(self, layers: int | None = None) -> tuple[list[dict], torch.Tensor]:
        """(component descriptions, [n, P, C] terms): embedding, then per layer its heads, its
        `o_proj` bias and its MLP (layers 0..`layers`; the ones after the prober cannot reach it)."""
        n_layers, n_heads = self.head.shape[2:]
        layers = n_layers - 1 if layers is None else layers
        names = [{"name": "embedding", "kind": "embedding", "layer": None, "head": None}]
        columns = [self.embedding[..., None]]
        for layer in range(layers + 1):
            names += [
                {"name": f"head:{layer}.{h}", "kind": "head", "layer": layer, "head": h}
                for h in range(n_heads)
            ]
            names.append(
                {"name": f"o_proj_bias:{layer}", "kind": "o_proj_bias", "layer": layer, "head": None}
            )
            names.append({"name": f"mlp:{layer}", "kind": "mlp", "layer": layer, "head": None})
            columns += [
                self.head[:, :, layer],
                self.o_proj_bias[:, :, layer, None],
                self.mlp[:, :, layer, None],
            ]
        return names, torch.cat(columns, dim=-1)


def _reshape(part: HeadAttribution, batch: int, n_positions: int) -> dict[str, torch.Tensor]:
    def shaped(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(batch, n_positions, *x.shape[1:])

    return {
        "head": shaped(part.exact),
        "o_proj_bias": shaped(part.o_proj_bias),
        "mlp": shaped(part.mlp),
        "embedding": shaped(part.embedding),
        "logit": shaped(part.logit),
    }


def component_terms(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    prober: nn.Linear,
    layer: int,
    final_norm_applied: bool,
    pad_token_id: int,
    batch_size: int = 8,
    progress: bool = False,
) -> ComponentTerms:
    """The exact decomposition at several tokens of each sequence, one forward pass per batch.

    Args:
        sequences: token ids of each probing sequence.
        positions: per sequence, its last thinking token then its end-template tokens (as
            `template_positions` gives them); absolute indices into the unpadded sequence.
    """
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if len(positions) != len(sequences) or not sequences:
        raise UserError("give one list of positions per sequence (and at least one sequence)")
    width = max(len(p) for p in positions)
    aligned = [[p[0]] * (width - len(p)) + list(p) for p in positions]  # [n, P], aligned at the end
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    starts = range(0, len(order), batch_size)
    if progress:
        starts = tqdm(starts, desc="decomposing", unit="batch")
    parts: dict[str, list[torch.Tensor]] = {
        key: [] for key in ("head", "o_proj_bias", "mlp", "embedding", "logit")
    }
    bias = 0.0
    for start in starts:
        chunk = order[start : start + batch_size]
        input_ids, attention_mask, _ = pad_left([sequences[i] for i in chunk], pad_token_id)
        padded = input_ids.shape[1]
        chunk_positions = torch.tensor([[padded - len(sequences[i]) + p for p in aligned[i]] for i in chunk])
        part = attribute_batch(
            model, input_ids, attention_mask, prober, layer, final_norm_applied, chunk_positions
        )
        bias = part.prober_bias
        for key, value in _reshape(part, len(chunk), width).items():
            parts[key].append(value)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    merged = {key: torch.cat(values)[inverse] for key, values in parts.items()}
    return ComponentTerms(
        **merged, prober_bias=bias, n_end=torch.tensor([len(p) - 1 for p in positions], dtype=torch.long)
    )


# -- summary (components.json) ----------------------------------------------------------------


def summarize(terms: ComponentTerms, layer: int, has_bias: Sequence[bool] | None = None) -> dict:
    """The content of components.json from the terms of a group (see docs/artifacts.md).

    Components are sorted by their mean change across the end template, most negative first
    (the ones that carry the drop). `o_proj` biases are listed only for layers that have one.
    """
    names, values = terms.flat(layer)  # [n, P, C]
    values = values.double()
    keep = [
        i
        for i, item in enumerate(names)
        if item["kind"] != "o_proj_bias" or (has_bias is not None and has_bias[item["layer"]])
    ]
    n = values.shape[0]
    change = values[:, -1] - values[:, 0]  # [n, C]
    steps = values[:, 1:] - values[:, :-1]  # [n, P-1, C]
    at_cliff = values[:, -1]  # [n, C]
    logit = terms.logit.double()
    logit_change = logit[:, -1] - logit[:, 0]
    total_change = float(logit_change.mean())
    components = []
    for i in keep:
        item = dict(names[i])
        item.update(
            component_class=CLASSES[item["kind"]],
            t_cliff_mean=float(at_cliff[:, i].mean()),
            t_cliff_std=float(at_cliff[:, i].std(correction=0)),
            change_mean=float(change[:, i].mean()),
            change_std=float(change[:, i].std(correction=0)),
            share_of_change=float(change[:, i].mean()) / total_change if abs(total_change) > 1e-12 else None,
            per_token_mean=[float(v) for v in steps[:, :, i].mean(0)],
        )
        components.append(item)
    components.sort(key=lambda c: (c["change_mean"], c["name"]))
    for rank, item in enumerate(components):
        item["rank"] = rank
    by_class: dict[str, dict] = {}
    for kind, label in CLASSES.items():
        index = [i for i, item in enumerate(names) if item["kind"] == kind]
        by_class[label] = {
            "change_mean": float(change[:, index].sum(-1).mean()),
            "t_cliff_mean": float(at_cliff[:, index].sum(-1).mean()),
        }
    by_layer = []
    for index_layer in range(layer + 1):
        row = {"layer": index_layer}
        for kind in ("head", "o_proj_bias", "mlp"):
            index = [
                i for i, item in enumerate(names) if item["kind"] == kind and item["layer"] == index_layer
            ]
            row[f"{CLASSES[kind].replace(' ', '_').lower()}_change"] = float(change[:, index].sum(-1).mean())
        by_layer.append(row)
    recon = values.sum(-1) + terms.prober_bias  # [n, P]
    return {
        "n_examples": n,
        "layer": layer,
        "prober_bias": terms.prober_bias,
        "n_positions": int(values.shape[1]),
        "logit": {
            "last_thinking_mean": float(logit[:, 0].mean()),
            "t_cliff_mean": float(logit[:, -1].mean()),
            "change_mean": total_change,
            "change_std": float(logit_change.std(correction=0)),
        },
        "by_class": by_class,
        "by_layer": by_layer,
        "components": components,
        "exact_max_error": float((recon - logit).abs().max()),
        "change_max_error": float(((values[:, -1] - values[:, 0]).sum(-1) - logit_change).abs().max()),
        "n_end_tokens": sorted({int(v) for v in terms.n_end}),
    }


# -- component specs, scaling and folding -----------------------------------------------------


@dataclass(frozen=True)
class Component:
    kind: str  # "mlp" or "head"
    layer: int
    head: int | None = None

    @property
    def name(self) -> str:
        return f"mlp:{self.layer}" if self.kind == "mlp" else f"head:{self.layer}.{self.head}"


def _model_and_adapter(loaded_or_model) -> tuple[nn.Module, ArchitectureAdapter]:
    model = getattr(loaded_or_model, "model", loaded_or_model)
    adapter = getattr(loaded_or_model, "adapter", None) or get_adapter(model)
    return model, adapter


def mlp_output_module(model: nn.Module, adapter: ArchitectureAdapter, layer: int) -> nn.Module:
    """The module whose output layer `layer` adds to the residual stream as its MLP term: the MLP,
    or its post-feedforward norm (Gemma). A missing module is a UserError naming the adapter."""
    block = adapter.layers(model)[layer]
    mlp = getattr(block, adapter.mlp_attr, None)
    if not isinstance(mlp, nn.Module):
        raise UserError(
            f"{adapter.name}: the adapter cannot find the MLP of layer {layer} (no '{adapter.mlp_attr}' "
            "module), so --components cannot scale it; name it in architectures.py"
        )
    if adapter.post_mlp_norm_attr:
        norm = getattr(block, adapter.post_mlp_norm_attr, None)
        if not isinstance(norm, nn.Module):
            raise UserError(
                f"{adapter.name}: the adapter cannot find layer {layer}'s "
                f"'{adapter.post_mlp_norm_attr}', so --components cannot scale its MLP"
            )
        return norm
    return mlp


def resolve_components(loaded_or_model, specs: Sequence[str]) -> list[Component]:
    """Check component specs (`mlp:L`, `head:L.H`) against the model: syntax, layer and head ranges,
    and that the adapter finds each MLP. Negative layers count from the end."""
    model, adapter = _model_and_adapter(loaded_or_model)
    components = check_ranges(specs, adapter.geometry(model))
    for component in components:
        if component.kind == "mlp":
            mlp_output_module(model, adapter, component.layer)
    return components


def check_ranges(specs: Sequence[str], geometry) -> list[Component]:
    """Parse component specs and check their layers and heads against a `HeadGeometry` (which a
    model's config gives before any weight is loaded)."""
    found = []
    for spec in parse_components(specs):
        kind, _, rest = spec.partition(":")
        layer_text, _, head_text = rest.partition(".")
        layer = int(layer_text)
        if not -geometry.n_layers <= layer < geometry.n_layers:
            raise UserError(
                f"component {spec!r}: layer {layer} is out of range: the model has layers "
                f"0..{geometry.n_layers - 1}"
            )
        layer %= geometry.n_layers
        head = None
        if kind == "head":
            head = int(head_text)
            if head >= geometry.n_heads:
                raise UserError(
                    f"component {spec!r}: head {head} is out of range: the model has heads "
                    f"0..{geometry.n_heads - 1} per layer"
                )
        found.append(Component(kind, layer, head))
    if not found:
        raise UserError(f"no component given: use {COMPONENT_SPEC_HELP}")
    return list(dict.fromkeys(found))


def _mlp_scaling_hook(gamma: float):
    def hook(module: nn.Module, args: tuple, output):
        return output * gamma  # [batch, pos, d_model]

    return hook


@contextmanager
def scale_components(loaded_or_model, specs: Sequence[str], gamma: float = 0.0) -> Iterator[list[Component]]:
    """Scale the chosen components' outputs by γ inside the block (any forward or `generate`).

    MLPs: a forward hook multiplies what the MLP adds to the residual stream (after Gemma's
    post-feedforward norm). Heads: `ablation.scale_heads` (their slice of the `o_proj` input).
    """
    model, adapter = _model_and_adapter(loaded_or_model)
    components = resolve_components(loaded_or_model, specs)
    hooks = [
        (mlp_output_module(model, adapter, c.layer), _mlp_scaling_hook(float(gamma)))
        for c in components
        if c.kind == "mlp"
    ]
    heads = [(c.layer, c.head) for c in components if c.kind == "head"]
    with add_hooks(forward_hooks=hooks), scale_heads(loaded_or_model, heads, gamma=gamma):
        yield components


def _mlp_fold_targets(model: nn.Module, adapter: ArchitectureAdapter, layer: int) -> list[nn.Parameter]:
    module = mlp_output_module(model, adapter, layer)
    if adapter.post_mlp_norm_attr:
        return [module.weight]
    down = getattr(module, adapter.mlp_down_attr, None)
    if not isinstance(down, nn.Linear):
        raise UserError(
            f"{adapter.name}: the adapter cannot find layer {layer}'s MLP output projection "
            f"'{adapter.mlp_down_attr}', so --components cannot fold its scale into the weights"
        )
    return [p for p in (down.weight, down.bias) if p is not None]


@torch.no_grad()
def fold_component_scaling(loaded_or_model, specs: Sequence[str], gamma: float) -> None:
    """Fold `scale_components(specs, gamma)` into the weights, in place.

    MLP: `down_proj` (weight and bias) times γ. Gemma's post-feedforward RMSNorm has gain
    `1 + weight`, so its weight becomes `γ·(1 + weight) − 1` (the gain times γ, whatever the
    family's convention). Heads: `ablation.fold_head_scaling`.
    """
    model, adapter = _model_and_adapter(loaded_or_model)
    components = resolve_components(loaded_or_model, specs)
    d_model = adapter.geometry(model).d_model
    for component in components:
        if component.kind != "mlp":
            continue
        if adapter.post_mlp_norm_attr:
            norm = mlp_output_module(model, adapter, component.layer)
            gain = _norm_gain(norm, d_model, norm.weight.device).to(norm.weight.dtype)  # [d_model]
            offset = gain - norm.weight  # 1 for Gemma's `1 + weight`, 0 for a plain gain
            norm.weight.copy_(gamma * gain - offset)
        else:
            for parameter in _mlp_fold_targets(model, adapter, component.layer):
                parameter.mul_(gamma)
    fold_head_scaling(loaded_or_model, [(c.layer, c.head) for c in components if c.kind == "head"], gamma)


@torch.no_grad()
def export_component_ablated_model(loaded, specs: Sequence[str], gamma: float, out_dir: str | Path) -> Path:
    """Write a checkpoint (`save_pretrained` + tokenizer) with the components' scale folded in;
    the loaded model is restored afterwards."""
    model, adapter = loaded.model, loaded.adapter
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} is not empty; choose a new folder for the exported model")
    components = resolve_components(loaded, specs)
    touched: list[nn.Parameter] = []
    for c in components:
        touched += (
            _mlp_fold_targets(model, adapter, c.layer)
            if c.kind == "mlp"
            else [adapter.o_proj(model, c.layer).weight]
        )
    saved = [(p, p.detach().clone()) for p in dict.fromkeys(touched)]
    try:
        fold_component_scaling(loaded, specs, gamma)
        model.save_pretrained(str(out_dir))
    finally:
        for parameter, value in saved:
            parameter.copy_(value)
    loaded.tokenizer.save_pretrained(str(out_dir))
    logger.info(
        "exported the model with %s scaled by %g to %s", ", ".join(c.name for c in components), gamma, out_dir
    )
    return out_dir


# -- the `components` stage -------------------------------------------------------------------


def _token_label(tokenizer, token_id: int) -> str:
    text = tokenizer.decode([int(token_id)])
    return text.encode("unicode_escape").decode("ascii") if text.strip() != text or not text else text


def run_components(
    loaded,
    prober,
    generations: str | Path,
    out_dir: str | Path,
    config=None,
    labels: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """The `components` stage: every component's term at t_cliff and its change across the
    thinking-end template, for one group; writes components.json + components.png.

    Args:
        prober: a loaded `prober.Prober` (any layer; components after its layer cannot reach it).
        generations: a generations.jsonl of harmful prompts (exactly that file is read).
        config: a `components.ComponentsConfig` (group, top, batch size).
        labels: its labels.jsonl (default: the one beside `generations`, if it covers every id).

    Returns the path of components.json.
    """
    config = config or ComponentsConfig()
    config.validate()
    group = group_name(config.group)
    generations = Path(generations)
    chosen = check_group(generations, labels, group)
    stage_config = {
        "model": loaded.model_id,
        "revision": loaded.revision,
        "prober": prober.fingerprint(),
        "layer": prober.layer,
        "final_norm_applied": prober.final_norm_applied,
        "generations": str(generations),
        "generations_digest": file_digest(generations),
        "labels": str(labels) if labels else None,
        "group": group,
        "top": config.top,
        "positions": "last thinking token and every end-template token; t_cliff = the last",
    }
    warn_if_unreliable(prober)
    run = RunFolder(
        out_dir,
        "components",
        stage_config,
        overwrite=overwrite,
        artifacts=["components.json", "components.png"],
    )
    with run.start(model_id=loaded.model_id, revision=loaded.revision, extra={"prober": prober.summary()}):
        return _components_stage(loaded, prober, chosen, run, group, config, progress)


def _components_stage(loaded, prober, chosen, run, group, config, progress) -> Path:
    sequences, positions = [], []
    for record in chosen:
        ids, regions = probing_tokens(loaded.tokenizer, record)
        sequences.append(ids)
        positions.append(template_positions(regions))
    terms = component_terms(
        loaded.model,
        sequences,
        positions,
        prober.linear,
        prober.layer,
        prober.final_norm_applied,
        loaded.tokenizer.pad_token_id,
        config.batch_size,
        progress,
    )
    n_layers = loaded.adapter.geometry(loaded.model).n_layers
    has_bias = [loaded.adapter.o_proj(loaded.model, i).bias is not None for i in range(n_layers)]
    summary = summarize(terms, prober.layer, has_bias)
    longest = max(range(len(chosen)), key=lambda i: len(positions[i]))
    width = summary["n_positions"]
    labels = [_token_label(loaded.tokenizer, sequences[longest][p]) for p in positions[longest]]
    summary = {
        "model": loaded.model_id,
        "group": group,
        "final_norm_applied": prober.final_norm_applied,
        "position_labels": ["(last thinking token)", *labels[1:]][-width:],
        **summary,
    }
    write_json(run.path("components.json"), summary)

    plotting.save_figure(
        plotting.plot_components(
            summary,
            top=config.top,
            title=f"{loaded.model_id}: what makes the cliff (layer {prober.layer} prober, {group}, n={len(chosen)})",
        ),
        run.path("components.png"),
    )
    classes = summary["by_class"]
    run.finish(
        {
            "n_examples": len(chosen),
            "logit_change_mean": summary["logit"]["change_mean"],
            "change_by_class": {name: value["change_mean"] for name, value in classes.items()},
            "exact_decomposition_max_error": summary["exact_max_error"],
            "change_decomposition_max_error": summary["change_max_error"],
        }
    )
    logger.info(
        "decomposed %d examples at %d tokens; max error %.2e (logit), %.2e (change)",
        len(chosen),
        width,
        summary["exact_max_error"],
        summary["change_max_error"],
    )
    return run.path("components.json")


def top_components(summary: dict, kind: str, count: int) -> list[str]:
    """The `count` components of `kind` ('mlp' or 'head') that carry most of the drop in a
    components.json (most negative mean change first), as specs for `scale_components`."""
    chosen = [c["name"] for c in summary["components"] if c["kind"] == kind]
    return chosen[:count]


# -- ablation by component ----------------------------------------------------------------------


def run_ablate_components(
    loaded,
    prober,
    conditions: dict[str, Sequence[str]],
    harmful_prompts: Sequence[dict],
    out_dir: str | Path,
    config=None,
    generation_config=None,
    benign_prompts: Sequence[dict] = (),
    judge=None,
    export_dir: str | Path | None = None,
    sources: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
    backend=None,
) -> dict[str, Path]:
    """`ablate --components`: scale each condition's components by γ, regenerate, measure.

    Writes component_ablation.json (one record per condition, the unablated baseline first when
    `config.baseline`: `condition`, `components`, `gamma`, `final_score_mean`, `asr`,
    `benign_refusal_rate`, `n_harmful`, `n_benign`) and component_ablation_generations.jsonl;
    with `export_dir`, a checkpoint with the LAST condition's components folded into the weights.

    Args:
        conditions: {name: component specs} (e.g. {"top 3 MLPs": ["mlp:20", ...]}).
        config: a `ablate.AblateConfig` (gamma, baseline; thresholds are not used here).
        backend: a `config.BackendConfig` for the regenerated answers. With vLLM each condition's
            components are folded into a checkpoint in a temporary folder of the run folder
            (`export_component_ablated_model`) that the engine generates from; the final refusal
            scores come from the hooked model either way.
    """
    config = config or AblateConfig()
    generation_config = generation_config or GenerationConfig()
    config.validate()
    if config.renormalize:
        raise UserError("--renormalize applies to heads only; drop it with --components")
    if not harmful_prompts:
        raise UserError("no harmful prompts to ablate on; check --prompts")
    if not conditions:
        raise UserError(f"no component given: use --components {COMPONENT_SPEC_HELP}")
    resolved = {
        name: [c.name for c in resolve_components(loaded, specs)] for name, specs in conditions.items()
    }
    if export_dir is not None and Path(export_dir).exists() and any(Path(export_dir).iterdir()):
        raise UserError(f"{export_dir} is not empty; choose a new folder for --export")
    gamma = float(config.gamma)
    stage_config = {
        "model": loaded.model_id,
        "revision": loaded.revision,
        "prober": prober.fingerprint(),
        "layer": prober.layer,
        "conditions": resolved,
        "gamma": gamma,
        "baseline": bool(config.baseline),
        "harmful_digest": prompts_digest(harmful_prompts),
        "benign_digest": prompts_digest(benign_prompts) if benign_prompts else None,
        "judge": getattr(judge, "name", None),
        "generation": generation_config.results_dict(),
        **(sources or {}),
    }
    if backend is not None and backend.backend != "hf":  # only then: earlier runs keep their fingerprint
        stage_config["backend"] = backend.backend
    warn_if_unreliable(prober)
    run = RunFolder(
        out_dir,
        "ablate_components",
        stage_config,
        overwrite=overwrite,
        artifacts=["component_ablation.json", "component_ablation_generations.jsonl"],
    )
    plan = ([("unablated", [])] if config.baseline else []) + list(resolved.items())
    with run.start(
        model_id=loaded.model_id,
        revision=loaded.revision,
        seed=generation_config.seed,
        extra={"prober": prober.summary(), "backend": backend_info(backend)},
    ):
        # a resumed run keeps the conditions measured and drops the cut-off one's generations
        results_path = run.path("component_ablation.json")
        generations_path = run.path("component_ablation_generations.jsonl")
        results, done = run.measured_conditions(
            results_path.name, generations_path.name, key=lambda record: record.get("condition")
        )
        total = sum(1 for name, _ in plan if name not in done) * (len(harmful_prompts) + len(benign_prompts))
        with (
            JsonlWriter(generations_path) as writer,
            tqdm(total=total, desc="ablate", unit="ex", disable=not progress) as bar,
        ):
            for name, specs in plan:
                if name in done:
                    continue
                export = partial(export_component_ablated_model, loaded, specs, gamma) if specs else None
                with (
                    generation_backend(loaded, backend, export, run.root) as answers,
                    scale_components(loaded, specs or [], gamma) if specs else _nothing(),
                ):
                    outcome = evaluate_condition(
                        loaded,
                        prober.linear,
                        prober.layer,
                        harmful_prompts,
                        benign_prompts,
                        generation_config,
                        judge=judge,
                        bar=bar,
                        condition=name,
                        backend=answers,
                    )
                for kind in ("harmful", "benign"):
                    for example in outcome[kind]:
                        writer.write({"condition": name, "set": kind, **example})
                results.append(
                    {"condition": name, "components": list(specs), "gamma": gamma, **outcome["metrics"]}
                )
                write_json(results_path, results)
        paths = {
            "component_ablation.json": results_path,
            "component_ablation_generations.jsonl": generations_path,
        }
        extra: dict = {"n_harmful": len(harmful_prompts), "n_benign": len(benign_prompts)}
        if export_dir is not None:
            name, specs = list(resolved.items())[-1]
            paths["export"] = export_component_ablated_model(loaded, specs, gamma, export_dir)
            extra["export"] = {
                "path": str(export_dir),
                "condition": name,
                "components": specs,
                "gamma": gamma,
            }
        run.finish(extra)
    return paths


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@dataclass
class ComponentsConfig(Config):
    """Every component's term of the exact decomposition, at t_cliff and across the end template (issue 12)."""

    group: str = option(
        "harmful_complied",
        "Examples to average over: harmful prompts the model complied with / refused, or all.",
        choices=("harmful_complied", "harmful_refused", "all", "harmful-complied", "harmful-refused"),
    )  # the old spelling is still read
    top: int = option(
        20, "Components shown in components.png's ranking (the heat map shows half as many).", min=1
    )
    batch_size: int = option(8, "Sequences per forward pass.", min=1)

"""Scale refusal suppression heads (paper §4.2): test the causal claim and export a repaired model.

The paper ablates a head by multiplying its attention output by γ (Eq. 5; γ=0 removes it,
γ>1 amplifies it). That output is exactly the head's slice of the `o_proj` input, so a forward
pre-hook on `o_proj` scales it without touching attention internals, for any forward or
`generate` call. An optional per-token renormalisation rescales the whole `o_proj` input back
to its original norm (Zhang et al. 2024, to avoid generation collapse).

Without renormalisation the same edit is linear in the weights: `W_O[:, slice_h] · (γ z_h) =
(γ W_O[:, slice_h]) · z_h`, so it folds into the `o_proj` weight columns and the repaired model
is an ordinary checkpoint that any inference engine serves. `run_ablation` measures, per
threshold of suppression heads, the final refusal score, the attack success rate of
regenerated answers and the refusal rate on benign prompts (paper Figure 8).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .architectures import ArchitectureAdapter, get_adapter
from .attribution import heads_at_threshold, prober_logits
from .errors import UserError
from .hooks import add_hooks

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


# -- the ablation study (paper Figure 8) --------------------------------------------------------

CONTROLS = ("none", "ranked", "random", "boost")  # the `control` of an ablation.json record, in plot order


def random_heads(
    ranking: Sequence[dict], fraction: float, n_layers: int, n_heads: int, seed: int
) -> list[Head]:
    """The random control of a threshold: as many heads as `heads_at_threshold` selects, drawn
    uniformly without replacement from the heads OUTSIDE that ranked selection.

    Deterministic per (seed, number of heads): the same seed draws the same heads for the same
    count, whatever the other thresholds. Returns (layer, head) pairs sorted.
    """
    import numpy as np

    n_total = n_layers * n_heads
    ranked = set(heads_at_threshold(ranking, fraction, n_total))
    pool = [
        (layer, head) for layer in range(n_layers) for head in range(n_heads) if (layer, head) not in ranked
    ]
    count = len(ranked)
    if count > len(pool):
        raise UserError(
            f"threshold {fraction:g} ablates {count} of {n_total} heads: fewer than that many are left "
            "for the random control; use thresholds of at most 0.5"
        )
    generator = np.random.default_rng([int(seed), count])
    chosen = generator.choice(len(pool), size=count, replace=False)
    return sorted(pool[int(i)] for i in chosen)


def condition_key(record: dict) -> tuple[float, str, int | None]:
    """(threshold, control, seed): what identifies one measured condition of ablation.json.

    Records written before the controls existed have no `control`: the threshold-0 record without
    heads is the unablated baseline ("none"), every other one a ranked condition.
    """
    control = record.get("control")
    if control is None:
        control = "none" if not record.get("heads") and float(record["threshold"]) == 0.0 else "ranked"
    seed = record.get("seed")
    return float(record["threshold"]), str(control), None if seed is None else int(seed)


def planned_conditions(
    thresholds: Sequence[float],
    baseline: bool = True,
    control: str = "none",
    control_seeds: Sequence[int] = (),
    boost_others: float | None = None,
) -> list[tuple]:
    """The `condition_key`s a sweep measures, in the order `run_ablation` measures them."""
    keys: list[tuple] = [(0.0, "none", None)] if baseline else []
    for threshold in sorted(float(t) for t in thresholds):
        keys.append((threshold, "ranked", None))
        if control == "random":
            keys += [(threshold, "random", int(seed)) for seed in control_seeds]
        if boost_others is not None:
            keys.append((threshold, "boost", None))
    return keys


def _sort_key(record: dict) -> tuple:
    threshold, control, seed = condition_key(record)
    return (
        threshold,
        CONTROLS.index(control) if control in CONTROLS else len(CONTROLS),
        -1 if seed is None else seed,
    )


def _final_scores(
    loaded, records: Sequence[dict], prober: nn.Linear, layer: int, batch_size: int
) -> torch.Tensor:
    """[n] refusal score (sigmoid of the prober logit) at the last token of each probing sequence."""
    from .templates import probing_tokens

    sequences = [probing_tokens(loaded.tokenizer, record)[0] for record in records]
    logits = prober_logits(loaded.model, sequences, prober, layer, loaded.tokenizer.pad_token_id, batch_size)
    return torch.sigmoid(logits)


def _refusals(loaded, records: Sequence[dict], labeler, judge) -> list[dict]:
    from .labeling import label_records

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
    from .generation import generate_records
    from .labeling import KeywordLabeler, is_attack_success

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


def run_ablation(
    loaded,
    prober: nn.Linear,
    layer: int,
    ranking: Sequence[dict],
    thresholds: Sequence[float],
    harmful_prompts: Sequence[dict],
    generation_config,
    benign_prompts: Sequence[dict] = (),
    gamma: float = 0.0,
    renormalize: bool = False,
    labeler=None,
    judge=None,
    baseline: bool = True,
    progress: bool = False,
    on_record=None,
    bar=None,
    control: str = "none",
    control_seeds: Sequence[int] = (),
    boost_others: float | None = None,
    skip: Sequence[tuple] = (),
    backend=None,
    workdir: str | Path | None = None,
) -> list[dict]:
    """For each threshold, ablate its suppression heads and measure the paper's Figure 8 metrics.

    Args:
        loaded: the `LoadedModel` under study.
        prober: `nn.Linear(d_model, 1)` reading decoder layer `layer` (final norm iff last layer).
        ranking: `heads.json` entries (`layer`, `head`, `rank`).
        thresholds: fractions of all n_layers × n_heads heads.
        harmful_prompts, benign_prompts: dicts with `id` and `prompt`.
        generation_config: a `generation.GenerationConfig`.
        labeler: a `labeling.KeywordLabeler` (default keywords if None).
        judge: an optional `labeling.ModelJudge` that replaces the keyword ASR.
        baseline: also measure the unablated model (threshold 0, no heads) first.
        on_record: called with each finished record (to write results as they come).
        control: "random" also measures, per threshold and seed of `control_seeds`, as many heads
            drawn at random from outside the ranked ones (`random_heads`).
        boost_others: also measure each threshold with its heads scaled by γ and every other head
            scaled by this factor (the authors' boosting control).
        skip: `condition_key`s already measured (a resumed run); they are not measured again.
        backend: a `config.BackendConfig`: what writes the answers (default: HF on the hooked model).
            vLLM cannot see hooks: each condition's heads are folded into a checkpoint exported to a
            temporary folder in `workdir` (`export_ablated_model`), an engine generates from it and is
            shut down, and the folder is removed; the unablated baseline uses the model's own folder.
            The final refusal scores come from the hooked model either way.

    Returns:
        One record per condition: `threshold`, `heads` ([[layer, head], ...]), `gamma`,
        `renormalize`, `control` ("none" for the baseline, "ranked", "random" or "boost"), `seed`
        (the random control's seed, else null), `boost_others` (the boost factor, else null),
        `final_score_mean`, `asr`, `benign_refusal_rate`, `n_harmful`, `n_benign`.
    """
    if not harmful_prompts:
        raise UserError("no harmful prompts to ablate on; check --prompts")
    check_foldable(backend, renormalize)
    from .backends import generation_backend

    geometry = loaded.adapter.geometry(loaded.model)
    n_total = geometry.n_layers * geometry.n_heads
    # (threshold, control, seed, heads, factor applied to the other heads)
    conditions: list[tuple[float, str, int | None, list[Head], float | None]] = []
    if baseline:
        conditions.append((0.0, "none", None, [], None))
    for threshold in sorted(float(t) for t in thresholds):
        conditions.append((threshold, "ranked", None, heads_at_threshold(ranking, threshold, n_total), None))
        if control == "random":
            conditions += [
                (
                    threshold,
                    "random",
                    int(seed),
                    random_heads(ranking, threshold, geometry.n_layers, geometry.n_heads, seed),
                    None,
                )
                for seed in control_seeds
            ]
        if boost_others is not None:
            conditions.append(
                (
                    threshold,
                    "boost",
                    None,
                    heads_at_threshold(ranking, threshold, n_total),
                    float(boost_others),
                )
            )
    done = set(skip)
    results = []
    for threshold, kind, seed, heads, others in conditions:
        if (threshold, kind, seed) in done:
            continue
        logger.info(
            "threshold %g (%s%s): scaling %d heads by %g%s",
            threshold,
            kind,
            "" if seed is None else f" seed {seed}",
            len(heads),
            gamma,
            "" if others is None else f", the others by {others:g}",
        )
        # what vLLM generates from: a checkpoint with this condition folded in (none: the model itself)
        edited = bool(heads) or others is not None
        export = partial(export_ablated_model, loaded, heads, gamma, boost_others=others) if edited else None
        with (
            generation_backend(loaded, backend, export, workdir) as answers,
            scale_heads(loaded, heads, gamma=gamma, renormalize=renormalize, boost_others=others),
        ):
            name = "unablated" if not heads else f"{threshold:g} ({len(heads)} heads)"
            if kind != "ranked" and heads:
                name += f" {kind}" + ("" if seed is None else f" seed {seed}")
            outcome = evaluate_condition(
                loaded,
                prober,
                layer,
                harmful_prompts,
                benign_prompts,
                generation_config,
                labeler,
                judge,
                progress,
                bar,
                name,
                answers,
            )
        record = {
            "threshold": threshold,
            "heads": [[layer_index, head] for layer_index, head in heads],
            "gamma": float(gamma),
            "renormalize": bool(renormalize),
            "control": kind,
            "seed": seed,
            "boost_others": others,
            **outcome["metrics"],
        }
        results.append(record)
        if on_record is not None:
            on_record(record, outcome)
    return results


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
    from .runs import read_json

    ranking = read_json(path)
    if (
        not isinstance(ranking, list)
        or not ranking
        or not all(isinstance(item, dict) and {"layer", "head", "rank"} <= set(item) for item in ranking)
    ):
        raise UserError(f"{path} is not a heads.json written by `refusal-cliff heads`")
    return ranking


def run_ablate(
    loaded,
    prober,
    heads_path: str | Path,
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
    """The `ablate` stage: ablation.json (one record per threshold, plus the unablated baseline at
    threshold 0 when `config.baseline`), ablation.png, ablation_generations.jsonl, and optionally the
    exported repaired model. A killed run resumes after the last finished threshold.

    Args:
        prober: a loaded `probe.Prober`.
        heads_path: heads.json written by `heads` on this model.
        config: a `config.AblateConfig` (thresholds, gamma, renormalize, baseline, export threshold).
        generation_config: a `config.GenerationConfig` for the regenerated answers.
        export_dir: also write a repaired checkpoint with the heads of `config.export_threshold`
            (default: the largest threshold) folded into the o_proj weights.
        backend: a `config.BackendConfig` for the regenerated answers (see `run_ablation`);
            metadata.json records it and its version.

    Returns the paths written, by name.
    """
    from tqdm.auto import tqdm

    from .backends import backend_info
    from .config import AblateConfig, GenerationConfig
    from .generation import prompts_digest
    from .probe import warn_if_unreliable
    from .runs import JsonlWriter, RunFolder, file_digest, read_json, read_jsonl, write_json, write_jsonl

    config = config or AblateConfig()
    generation_config = generation_config or GenerationConfig()
    config.validate()
    thresholds = sorted(set(config.thresholds))
    gamma, renormalize, baseline = float(config.gamma), bool(config.renormalize), bool(config.baseline)
    control, control_seeds = config.control, tuple(int(seed) for seed in config.control_seeds)
    boost_others = None if config.boost_others is None else float(config.boost_others)
    if not harmful_prompts:
        raise UserError("no harmful prompts to ablate on; check --prompts")
    ranking = read_ranking(heads_path)
    geometry = loaded.adapter.geometry(loaded.model)
    n_total = geometry.n_layers * geometry.n_heads
    if len(ranking) != n_total:
        raise UserError(
            f"{heads_path} ranks {len(ranking)} heads but the model has {n_total}; run `heads` on this model"
        )
    export_threshold = None
    if export_dir is not None:
        if renormalize:
            raise UserError("--export cannot fold --renormalize into weights; export without --renormalize")
        export_threshold = (
            max(thresholds) if config.export_threshold is None else float(config.export_threshold)
        )
        if Path(export_dir).exists() and any(Path(export_dir).iterdir()):
            raise UserError(f"{export_dir} is not empty; choose a new folder for --export")
    elif config.export_threshold is not None:
        raise UserError("--export-threshold needs --export DIR")
    check_foldable(backend, renormalize)
    stage_config = {
        "model": loaded.model_id,
        "revision": loaded.revision,
        "prober": prober.fingerprint(),
        "layer": prober.layer,
        "heads_digest": file_digest(heads_path),
        "thresholds": thresholds,
        "gamma": gamma,
        "renormalize": renormalize,
        "baseline": baseline,
        "harmful_digest": prompts_digest(harmful_prompts),
        "benign_digest": prompts_digest(benign_prompts) if benign_prompts else None,
        "judge": getattr(judge, "name", None),
        "generation": generation_config.results_dict(),
        **(sources or {}),
    }
    if control != "none":  # only when used, so that runs made before the controls existed still resume
        stage_config.update(control=control, control_seeds=list(control_seeds))
    if boost_others is not None:
        stage_config["boost_others"] = boost_others
    if backend is not None and backend.backend != "hf":  # only then: earlier runs keep their fingerprint
        stage_config["backend"] = backend.backend
    warn_if_unreliable(prober)
    run = RunFolder(
        out_dir,
        "ablate",
        stage_config,
        overwrite=overwrite,
        artifacts=["ablation.json", "ablation.png", "ablation_generations.jsonl"],
    )
    with run.start(
        model_id=loaded.model_id,
        revision=loaded.revision,
        seed=generation_config.seed,
        extra={"prober": prober.summary(), "backend": backend_info(backend)},
    ):
        results_path, generations_path = run.path("ablation.json"), run.path("ablation_generations.jsonl")
        results: list[dict] = read_json(results_path) if run.resumed and results_path.is_file() else []
        done = {condition_key(record) for record in results}
        if done:
            logger.info("resuming: %d conditions already measured", len(done))
        if generations_path.exists():  # drop the generations of a condition that was not finished
            kept = [r for r in read_jsonl(generations_path) if "threshold" in r and condition_key(r) in done]
            write_jsonl(generations_path, kept)
        planned = planned_conditions(thresholds, baseline, control, control_seeds, boost_others)
        n_conditions = sum(1 for key in planned if key not in done)
        total = n_conditions * (len(harmful_prompts) + len(benign_prompts))
        with (
            JsonlWriter(generations_path) as writer,
            tqdm(total=total, desc="ablate", unit="ex", disable=not progress) as bar,
        ):

            def keep(record: dict, outcome: dict) -> None:
                # generations first: ablation.json is what marks a threshold as done
                for kind in ("harmful", "benign"):
                    for example in outcome[kind]:
                        writer.write(
                            {
                                "threshold": record["threshold"],
                                "control": record["control"],
                                "seed": record["seed"],
                                "set": kind,
                                **example,
                            }
                        )
                results.append(record)
                write_json(results_path, sorted(results, key=_sort_key))

            if n_conditions:
                run_ablation(
                    loaded,
                    prober.linear,
                    prober.layer,
                    ranking,
                    thresholds,
                    harmful_prompts,
                    generation_config,
                    benign_prompts,
                    gamma,
                    renormalize,
                    judge=judge,
                    baseline=baseline,
                    progress=False,
                    on_record=keep,
                    bar=bar,
                    control=control,
                    control_seeds=control_seeds,
                    boost_others=boost_others,
                    skip=sorted(done, key=str),
                    backend=backend,
                    workdir=run.root,
                )
        results = sorted(results, key=_sort_key)
        write_json(results_path, results)
        from .plotting import plot_ablation, save_figure  # lazy: matplotlib is slow to import

        save_figure(plot_ablation(results), run.path("ablation.png"))
        paths = {
            "ablation.json": results_path,
            "ablation.png": run.path("ablation.png"),
            "ablation_generations.jsonl": generations_path,
        }
        extra: dict = {"n_harmful": len(harmful_prompts), "n_benign": len(benign_prompts)}
        if export_dir is not None:
            heads = heads_at_threshold(ranking, export_threshold, n_total)
            paths["export"] = export_ablated_model(loaded, heads, gamma, export_dir)
            extra["export"] = {
                "path": str(export_dir),
                "threshold": export_threshold,
                "gamma": gamma,
                "heads": [list(h) for h in heads],
                "measured": True,
            }
        run.finish(extra)
    return paths

"""The `ablate` stage: scale the refusal suppression heads by each gamma, measure refusal score and
ASR per condition (with random-head controls), and export the folded model (the head scaling itself
is `compute.ablation`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from refusal_cliff.compute.ablation import (
    Head,
    check_foldable,
    evaluate_condition,
    export_ablated_model,
    read_ranking,
    scale_heads,
)
from refusal_cliff.compute.attribution import heads_at_threshold
from refusal_cliff.compute.backends import backend_info, generation_backend
from refusal_cliff.compute.generation import prompts_digest
from refusal_cliff.compute.prober import warn_if_unreliable
from refusal_cliff.core.config import (
    COMPONENT_SPEC_HELP,
    SEED_BOUNDS,
    THRESHOLDS_BOUNDS,
    THRESHOLDS_HELP,
    Config,
    GenerationConfig,
    check_thresholds,
    option,
    parse_components,
    parse_floats,
    parse_ints,
)
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.runs import (
    JsonlWriter,
    RunFolder,
    file_digest,
    write_json,
)
from refusal_cliff.report.plotting import plot_ablation, save_figure

logger = logging.getLogger(__name__)


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
        generation_config: a `config.GenerationConfig`.
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
        prober: a loaded `prober.Prober`.
        heads_path: heads.json written by `heads` on this model.
        config: a `ablate.AblateConfig` (thresholds, gamma, renormalize, baseline, export threshold).
        generation_config: a `config.GenerationConfig` for the regenerated answers.
        export_dir: also write a repaired checkpoint with the heads of `config.export_threshold`
            (default: the largest threshold) folded into the o_proj weights.
        backend: a `config.BackendConfig` for the regenerated answers (see `run_ablation`);
            metadata.json records it and its version.

    Returns the paths written, by name.
    """
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
        results, done = run.measured_conditions(
            results_path.name,
            generations_path.name,
            key=lambda record: condition_key(record) if "threshold" in record else None,
        )
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


@dataclass
class AblateConfig(Config):
    """Head ablation by scaling (paper §4.2, Figure 8)."""

    thresholds: tuple[float, ...] = option(
        (0.01, 0.03, 0.1), THRESHOLDS_HELP, parse=parse_floats, **THRESHOLDS_BOUNDS
    )
    gamma: float = option(0.0, "Scale of the chosen heads' outputs: 0 removes them, >1 amplifies them.")
    renormalize: bool = option(
        False, "Rescale each token's o_proj input back to its original norm (cannot be exported)."
    )
    baseline: bool = option(
        True, "Also measure the unablated model (threshold 0).", flag="baseline/no-baseline"
    )
    export_threshold: float | None = option(
        None,
        "Threshold whose heads --export folds (default: the largest of "
        "--thresholds); must be one of --thresholds.",
        type=float,
    )
    limit: int | None = option(None, "Use the first N prompts of each set.", type=int, min=1)
    column: str | None = option(None, "Prompt column (detected when omitted).", type=str)
    judge: str | None = option(
        None, "LlamaGuard-style judge model for ASR (default: keyword labels).", type=str
    )
    control: str = option(
        "none",
        "random: also ablate, per threshold and seed, as many heads drawn at random "
        "from the heads outside the ranked top ones.",
        choices=("none", "random"),
    )
    control_seeds: tuple[int, ...] = option(
        (0, 1, 2),
        "Seeds of the random control (one draw per threshold and seed).",
        parse=parse_ints,
        **SEED_BOUNDS,
    )
    boost_others: float | None = option(
        None,
        "Boosting control: also measure each threshold with its heads "
        "scaled by γ and every OTHER head scaled by FACTOR.",
        type=float,
        min=0.0,
    )
    components: tuple[str, ...] = option(
        (),
        "Scale these components instead of the heads of --heads: "
        f"comma-separated {COMPONENT_SPEC_HELP} (e.g. the top MLPs of "
        "components.json); --export folds them (MLPs into down_proj).",
        parse=parse_components,
        show="",
    )

    def validate(self) -> None:
        check_thresholds(self.thresholds)
        if self.export_threshold is not None and not any(
            abs(self.export_threshold - t) < 1e-12 for t in self.thresholds
        ):
            raise UserError(
                f"--export-threshold {self.export_threshold:g} was not measured: pick one of "
                f"--thresholds ({','.join(f'{t:g}' for t in self.thresholds)})"
            )
        if self.renormalize and self.gamma == 1.0:
            pass  # scaling by 1 changes nothing; allowed
        if not self.control_seeds:
            raise UserError("--control-seeds is empty: give the random control's seeds, e.g. 0,1,2")
        if self.components:
            # these choose and control the RANKED heads of --heads; --components names its set itself
            defaults = type(self)()
            ignored = [
                flag
                for flag, name in (
                    ("--thresholds", "thresholds"),
                    ("--control", "control"),
                    ("--control-seeds", "control_seeds"),
                    ("--boost-others", "boost_others"),
                    ("--export-threshold", "export_threshold"),
                )
                if getattr(self, name) != getattr(defaults, name)
            ]
            if ignored:
                raise UserError(
                    f"{', '.join(ignored)} choose among the ranked heads of --heads; --components scales "
                    "exactly the components it names: drop them, or run the ranked heads separately"
                )
        if self.control == "random":
            if len(set(self.control_seeds)) != len(self.control_seeds):
                raise UserError(f"--control-seeds repeats a seed: {','.join(map(str, self.control_seeds))}")
            if any(t > 0.5 for t in self.thresholds):
                raise UserError(
                    "--control random draws as many heads from OUTSIDE the ranked ones, so every "
                    f"threshold must be at most 0.5, got {','.join(f'{t:g}' for t in self.thresholds)}"
                )

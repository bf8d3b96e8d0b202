"""The `heads` stage: per-head contributions to the prober's logit at t_cliff (paper Eq. 4), the
ranking of refusal suppression heads and their attention patterns (the computation is
`compute.attribution`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from refusal_cliff.compute.attribution import (
    HeadAttribution,
    attention_patterns,
    head_marks,
    heads_at_threshold,
    heads_job,
    rank_heads,
)
from refusal_cliff.compute.executors import run_job
from refusal_cliff.compute.labeling import check_group, group_name
from refusal_cliff.compute.prober import warn_if_unreliable
from refusal_cliff.core.config import (
    THRESHOLDS_BOUNDS,
    THRESHOLDS_HELP,
    Config,
    check_thresholds,
    option,
    parse_floats,
)
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.runs import RunFolder, file_digest, write_json
from refusal_cliff.report import plotting

logger = logging.getLogger(__name__)


# -- the `heads` stage ---------------------------------------------------------------------


def run_heads(
    loaded,
    prober,
    generations: str | Path,
    out_dir: str | Path,
    config=None,
    labels: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    executor=None,
) -> Path:
    """The `heads` stage: attribute the group's examples, rank the heads, write heads.json + heads.png.

    Args:
        prober: a loaded `prober.Prober`.
        generations: a generations.jsonl of harmful prompts (exactly that file is read).
        config: a `heads.HeadsConfig` (group, thresholds, rank_by, batch size).
        labels: its labels.jsonl (default: the one beside `generations`, if it covers every id).
        executor: where the attribution runs (`executors.make_executor`; default this process); Ray
            workers call the same `attribute_records` on shards of the examples (`out_dir/shards/heads/`).

    Returns the path of heads.json.
    """
    config = config or HeadsConfig()
    config.validate()
    group = group_name(config.group)
    generations = Path(generations)
    chosen = check_group(generations, labels, group)
    thresholds = sorted(set(config.thresholds))
    rank_by, batch_size = config.rank_by, config.batch_size
    layer, final_norm_applied = prober.layer, prober.final_norm_applied
    patterns = config.patterns
    if patterns is not None:
        geometry = loaded.adapter.geometry(loaded.model)
        n_total = geometry.n_layers * geometry.n_heads
        if not 1 <= patterns <= n_total:
            raise UserError(
                f"--patterns {patterns}: the model has {n_total} heads ({geometry.n_layers} layers of "
                f"{geometry.n_heads}); give a number from 1 to {n_total}"
            )
    stage_config = {
        "model": loaded.model_id,
        "revision": loaded.revision,
        "prober": prober.fingerprint(),
        "layer": layer,
        "final_norm_applied": final_norm_applied,
        "generations": str(generations),
        "generations_digest": file_digest(generations),
        "labels": str(labels) if labels else None,
        "group": group,
        "thresholds": thresholds,
        "rank_by": rank_by,
        "t_cliff": "last token of the probing sequence",
    }
    artifacts = ["heads.json", "heads.png"]
    if patterns is not None:  # only when asked, so that earlier runs keep their fingerprint
        stage_config["patterns"] = patterns
        artifacts.append("patterns.json")
    warn_if_unreliable(prober)
    run = RunFolder(out_dir, "heads", stage_config, overwrite=overwrite, artifacts=artifacts)
    extra = {"prober": prober.summary()}
    if executor is not None:
        extra["executor"] = executor.info()
    with run.start(model_id=loaded.model_id, revision=loaded.revision, extra=extra):
        return _heads_stage(
            loaded, prober, chosen, run, group, thresholds, rank_by, batch_size, progress, patterns, executor
        )


def _heads_stage(
    loaded,
    prober,
    chosen,
    run,
    group,
    thresholds,
    rank_by,
    batch_size,
    progress,
    patterns: int | None = None,
    executor=None,
) -> Path:
    rows = run_job(  # attribute_records here, or on a Ray executor's workers shard by shard
        executor,
        loaded,
        heads_job(prober, batch_size),
        chosen,
        run.root,
        batch_size,
        fingerprint=run.fingerprint,
        progress=progress,
    )
    attribution = HeadAttribution.concatenate([row for _, row in rows])
    ranking = rank_heads(attribution, rank_by)
    geometry = loaded.adapter.geometry(loaded.model)
    write_json(run.path("heads.json"), ranking)

    # colour: w·Δh, the paper-form score less the prober bias that every head shares
    matrix = plotting.heads_matrix(ranking, "contribution", geometry.n_layers, geometry.n_heads)
    plotting.save_figure(
        plotting.plot_heads(
            matrix - attribution.prober_bias,
            marks=head_marks(ranking, thresholds, geometry.n_layers * geometry.n_heads),
            title=f"{loaded.model_id}: head contributions at t_cliff ({group}, n={len(chosen)})",
        ),
        run.path("heads.png"),
    )
    n_total = geometry.n_layers * geometry.n_heads
    residual = (attribution.exact_total() - attribution.logit).abs().max()
    extra: dict = {}
    if patterns is not None:
        top_heads = [
            (item["layer"], item["head"]) for item in sorted(ranking, key=lambda h: h["rank"])[:patterns]
        ]
        pattern_data = attention_patterns(loaded, chosen, top_heads, batch_size)
        ranks = {(item["layer"], item["head"]): item for item in ranking}
        for entry in pattern_data["mass_mean"]:
            item = ranks[(entry["layer"], entry["head"])]
            entry.update(rank=item["rank"], contribution=item["contribution"])
        write_json(run.path("patterns.json"), pattern_data)
        extra["patterns"] = {"k": patterns, "mass_mean": pattern_data["mass_mean"]}
    run.finish(
        {
            "n_examples": len(chosen),
            "prober_bias": attribution.prober_bias,
            "suppression_heads": {str(t): heads_at_threshold(ranking, t, n_total) for t in thresholds},
            "exact_decomposition_max_error": float(residual),
            "mean_logit": float(attribution.logit.mean()),
            **extra,
        }
    )
    logger.info("attributed %d examples; exact decomposition max error %.2e", len(chosen), float(residual))
    return run.path("heads.json")


@dataclass
class HeadsConfig(Config):
    """Suppression-head attribution at t_cliff (paper §4.1)."""

    group: str = option(
        "harmful_complied",
        "Examples to average over: harmful prompts the model complied with / refused, or all.",
        choices=("harmful_complied", "harmful_refused", "all", "harmful-complied", "harmful-refused"),
    )  # the old spelling is still read
    thresholds: tuple[float, ...] = option(
        (0.01, 0.03, 0.1), THRESHOLDS_HELP + " Marked in heads.png.", parse=parse_floats, **THRESHOLDS_BOUNDS
    )
    rank_by: str = option(
        "contribution",
        "Rank by the paper's score w·Δh + b, or by the exact decomposition term.",
        choices=("contribution", "exact"),
    )
    batch_size: int = option(8, "Sequences per forward pass.", min=1)
    patterns: int | None = option(
        None,
        "Also save the attention weights of the top K suppression heads at t_cliff "
        "(patterns.json: top source tokens and mass per region).",
        type=int,
        min=1,
    )

    def validate(self) -> None:
        check_thresholds(self.thresholds)

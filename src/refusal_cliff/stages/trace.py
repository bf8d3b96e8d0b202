"""The `trace` stage: the prober's score at every token of each probing sequence, cliff metrics and
averaged curves, resumable (the computation is `compute.tracing`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from refusal_cliff.compute.prober import warn_if_unreliable
from refusal_cliff.compute.tracing import (
    CLIFF,
    CURVES,
    DIRECTION_CURVES,
    TRACES,
    TraceInput,
    load_trace_inputs,
    trace_into,
)
from refusal_cliff.core.config import Config, option
from refusal_cliff.core.runs import RunFolder, file_digest, fingerprint_ids


@dataclass
class TraceConfig(Config):
    """Per-token traces and cliff metrics."""

    plateau: str = option(
        "max",
        "Plateau: max of the 8-token moving average over the thinking, or its mean.",
        choices=("max", "mean"),
    )
    t_cliff: str = option(
        "last",
        "t_cliff: last token of the end template, or its largest one-step drop.",
        choices=("last", "max_drop"),
    )
    batch_size: int = option(8, "Sequences per forward pass.", min=1)
    direction_layer: int | None = option(
        None,
        "With --direction: the layer whose difference-in-means direction "
        "scores each token (default: the prober's layer).",
        type=int,
    )


@dataclass
class TraceRun:
    out_dir: Path
    n_examples: int  # examples in the trace
    written: int  # examples traced by this call (0: everything was done already)


def run_trace(
    loaded,
    prober,
    inputs: Sequence[TraceInput],
    out_dir: str | Path,
    config=None,
    overwrite: bool = False,
    progress: bool = True,
    direction=None,
    executor=None,
) -> TraceRun:
    """The `trace` stage: every token of each input's probing sequences scored by the prober;
    writes `traces.parquet/`, `cliff.jsonl`, `curves.json` and `metadata.json` (resumable by id).

    Args:
        prober: a loaded `prober.Prober` (checked against the model by `load_prober`).
        inputs: the generations files to trace (`TraceInput`), read exactly as given.
        config: a `trace.TraceConfig`.
        direction: a `prober.Direction` (`prober.load_direction`) of this model: its standardised
            projection is scored in the same pass (traces' `direction_score`, `direction_curves.json`).
        executor: where the forward passes run (`executors.make_executor`; default this process).
    """
    config = config or TraceConfig()
    records, groups = load_trace_inputs(inputs)
    sources = []
    for item in inputs:
        labels = [item.labels] if isinstance(item.labels, (str, Path)) else list(item.labels or [])
        sources.append(
            {
                "generations": str(item.generations),
                "digest": file_digest(item.generations),
                "harmful": item.harmful,
                "labels": [file_digest(p) for p in labels],
            }
        )
    stage_config = {
        "model": loaded.model_id,
        "revision": loaded.revision,
        "dtype": str(next(loaded.model.parameters()).dtype),
        "prober": prober.fingerprint(),
        "inputs": sources,
        "plateau": config.plateau,
        "t_cliff": config.t_cliff,
        "groups": fingerprint_ids(f"{k}={v}" for k, v in sorted(groups.items())),
    }
    artifacts = [CLIFF, CURVES, TRACES]
    extra = {"prober": prober.summary()}
    if direction is not None:  # only when used, so that earlier runs keep their fingerprint
        stage_config["direction"] = direction.fingerprint()
        artifacts.append(DIRECTION_CURVES)
        extra["direction"] = {
            "fingerprint": direction.fingerprint(),
            "layer": direction.layer,
            "cosine_to_prober": direction.metadata.get("layers", {})
            .get(str(direction.layer), {})
            .get("cosine_to_prober"),
        }
    if executor is not None:
        extra["executor"] = executor.info()
        artifacts.append("shards")
    run = RunFolder(out_dir, "trace", stage_config, overwrite=overwrite, artifacts=artifacts)
    warn_if_unreliable(prober)
    with run.start(model_id=loaded.model_id, revision=loaded.revision, extra=extra):
        written = trace_into(
            loaded,
            prober,
            records,
            out_dir,
            groups,
            config.batch_size,
            config.plateau,
            config.t_cliff,
            progress=progress,
            direction=direction,
            executor=executor,
        )
        run.finish({"n_examples": len(records)})
    return TraceRun(Path(out_dir), len(records), written)

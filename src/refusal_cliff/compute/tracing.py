"""Per-token refusal traces and the refusal-cliff metrics computed on them.

A trace is `refusal_score(h_j)` for every position j of an example's probing
sequence (prompt + thinking + end template), each token tagged with its region.
The paper's refusal cliff is the drop of this score over the few end-template
tokens; this module computes traces (one forward pass per batch, stopped at the
prober's layer, the prober applied inside the hook so no hidden state is kept),
the metrics on one trace (plateau, final score, MS, t_cliff, drop), averaged
normalised curves per group, layer-wise traces (several probers in one pass), the
thinking-clipping records, and the `traces.parquet` / `cliff.jsonl` /
`curves.json` artifacts (docs/artifacts.md), written streamed and resumable by id.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from refusal_cliff.compute.activations import iter_activations
from refusal_cliff.compute.executors import ShardJob, run_job
from refusal_cliff.compute.labeling import group_of, join_labels, labels_for, read_generations
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.runs import (
    JsonlWriter,
    atomic_write_text,
    chunked,
    completed_ids,
    read_jsonl,
    write_json,
)
from refusal_cliff.core.templates import REGION_END, REGION_THINKING, probing_tokens


def _trace_compute(loaded, records, progress=False, *, prober, batch_size, direction):
    return trace_records(loaded, prober, records, batch_size, direction=direction)


def _trace_write(path: Path, results, score_columns: dict[int, str]) -> None:
    """One parquet row per token; `score_columns`: prober layer -> its score column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, list] = {"id": [], "position": [], "token_id": [], "region": []}
    scores: dict[int, list] = {layer: [] for layer in score_columns}
    direction_scores = []
    for result in results:
        n = len(result.token_ids)
        columns["id"] += [result.id] * n
        columns["position"] += list(range(n))
        columns["token_id"] += list(result.token_ids)
        columns["region"] += list(result.regions)
        for layer in score_columns:
            scores[layer].append(result.scores_by_layer[layer])
        if result.direction_scores is not None:
            direction_scores.append(result.direction_scores)
    table = {
        "id": pa.array(columns["id"], pa.string()),
        "position": pa.array(columns["position"], pa.int32()),
        "token_id": pa.array(columns["token_id"], pa.int32()),
        "region": pa.array(columns["region"], pa.string()),
    }
    for layer, name in score_columns.items():
        values = np.concatenate(scores[layer]).astype(np.float32) if scores[layer] else []
        table[name] = pa.array(values, pa.float32())
    if direction_scores:
        table["direction_score"] = pa.array(np.concatenate(direction_scores).astype(np.float32), pa.float32())
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table(table), tmp)
    os.replace(tmp, path)


def _trace_read(path: Path, score_columns: dict[int, str]) -> list:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    ids = table.column("id").to_pylist()
    token_ids = table.column("token_id").to_pylist()
    regions = table.column("region").to_pylist()
    scores = {
        layer: table.column(name).to_numpy().astype(np.float32) for layer, name in score_columns.items()
    }
    direction = (
        table.column("direction_score").to_numpy() if "direction_score" in table.column_names else None
    )
    results, start = [], 0
    for stop in range(1, len(ids) + 1):
        if stop == len(ids) or ids[stop] != ids[start]:
            results.append(
                TraceResult(
                    ids[start],
                    token_ids[start:stop],
                    regions[start:stop],
                    {layer: values[start:stop] for layer, values in scores.items()},
                    None if direction is None else direction[start:stop].astype(np.float32),
                )
            )
            start = stop
    return results


def trace_job(prober, batch_size: int, direction=None, name: str = "trace") -> ShardJob:
    """`trace`'s shards: `tracing.trace_records` per shard, parquet files of (id, position, token, score).
    `evaluate`'s final scores use it too (`name` "final_score")."""
    compute = partial(_trace_compute, prober=prober, batch_size=batch_size, direction=direction)
    return _traces_job(name, compute, {prober.layer: "score"})


def _traces_job(name: str, compute, score_columns: dict[int, str]) -> ShardJob:
    """A job whose results are `TraceResult`s, kept as parquet with one score column per layer."""
    return ShardJob(
        name,
        compute,
        partial(_trace_write, score_columns=score_columns),
        partial(_trace_read, score_columns=score_columns),
        lambda result: str(result.id),
        ".parquet",
    )


def _layerwise_compute(loaded, records, progress=False, *, probers, batch_size):
    return trace_records_layerwise(loaded, probers, records, batch_size)


def layerwise_job(probers, batch_size: int) -> ShardJob:
    """`layers`' traces: `tracing.trace_records_layerwise` per shard, parquet files with a `score_L`
    column per prober layer L."""
    columns = {prober.layer: f"score_{prober.layer}" for prober in probers}
    return _traces_job(
        "layerwise", partial(_layerwise_compute, probers=probers, batch_size=batch_size), columns
    )


logger = logging.getLogger(__name__)

PLATEAU_METHODS = ("max", "mean")
T_CLIFF_METHODS = ("last", "max_drop")
DEFAULT_WINDOW = 8
N_POINTS = 101


TRACES = "traces.parquet"
CLIFF = "cliff.jsonl"
CURVES = "curves.json"
LAYERWISE = "layerwise.json"
DIRECTION_CURVES = "direction_curves.json"
CLIPPING = "clipping.json"


# -- metrics on one trace (pure numpy) -------------------------------------------------------


def _as_arrays(scores: Sequence[float], regions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    regions = np.asarray(regions)
    if scores.ndim != 1 or len(scores) != len(regions) or len(scores) == 0:
        raise ValueError(f"a trace needs as many scores as regions (got {scores.shape}, {len(regions)})")
    return scores, regions


def _end_positions(regions: np.ndarray) -> np.ndarray:
    positions = np.flatnonzero(regions == REGION_END)
    if len(positions) == 0:
        raise ValueError("the trace has no end-template token")
    return positions


def moving_average(values: Sequence[float], window: int = DEFAULT_WINDOW) -> np.ndarray:
    """Moving average over full windows; a series shorter than `window` gives its one mean."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return values
    window = max(1, min(window, len(values)))
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    return (cumulative[window:] - cumulative[:-window]) / window


def plateau(
    scores: Sequence[float], regions: Sequence[str], method: str = "max", window: int = DEFAULT_WINDOW
) -> float:
    """The refusal intention held during thinking (paper's "maximum refusal intention" I).

    `max` (default): maximum of the `window`-token moving average over the thinking region
    (the average of all thinking tokens if there are fewer than `window`). `mean`: mean over
    the thinking region. With no thinking token at all (e.g. thinking clipped to 0%) the plateau
    is undefined: NaN (written as null), and so is MS.
    """
    if method not in PLATEAU_METHODS:
        raise UserError(f"plateau method must be one of {', '.join(PLATEAU_METHODS)}, not {method!r}")
    scores, regions = _as_arrays(scores, regions)
    span = scores[regions == REGION_THINKING]
    if len(span) == 0:
        return float("nan")
    if method == "mean":
        return float(span.mean())
    return float(moving_average(span, window).max())


def final_score(scores: Sequence[float], regions: Sequence[str]) -> float:
    """I': the score at the last end-template token (where the answer's first token comes from)."""
    scores, regions = _as_arrays(scores, regions)
    return float(scores[_end_positions(regions)[-1]])


def t_cliff(scores: Sequence[float], regions: Sequence[str], method: str = "last") -> int:
    """Position of the cliff: `last` (default) the last end-template token; `max_drop` the
    end-template position with the largest one-step drop `score[j-1] - score[j]` (earliest on ties)."""
    if method not in T_CLIFF_METHODS:
        raise UserError(f"t_cliff method must be one of {', '.join(T_CLIFF_METHODS)}, not {method!r}")
    scores, regions = _as_arrays(scores, regions)
    positions = _end_positions(regions)
    if method == "last":
        return int(positions[-1])
    positions = positions[positions > 0]
    if len(positions) == 0:  # the sequence is the end template alone, starting at 0
        return int(_end_positions(regions)[-1])
    drops = scores[positions - 1] - scores[positions]
    return int(positions[int(np.argmax(drops))])


def cliff_drop(scores: Sequence[float], regions: Sequence[str]) -> float:
    """Score at the last token before the end template minus the final score (NaN if none precedes)."""
    scores, regions = _as_arrays(scores, regions)
    start = _end_positions(regions)[0]
    if start == 0:
        return float("nan")
    return float(scores[start - 1] - final_score(scores, regions))


def cliff_metrics(
    scores: Sequence[float],
    regions: Sequence[str],
    plateau_method: str = "max",
    t_cliff_method: str = "last",
    window: int = DEFAULT_WINDOW,
) -> dict:
    """`{plateau, final, ms, t_cliff, drop}` of one trace; `ms = plateau - final` (signed)."""
    plateau_value = plateau(scores, regions, plateau_method, window)
    final = final_score(scores, regions)
    return {
        "plateau": plateau_value,
        "final": final,
        "ms": plateau_value - final,
        "t_cliff": t_cliff(scores, regions, t_cliff_method),
        "drop": cliff_drop(scores, regions),
    }


# -- normalisation and averaging ------------------------------------------------------------


def normalized_positions(length: int) -> np.ndarray:
    """Positions 0..length-1 mapped linearly onto 0..100."""
    if length == 1:
        return np.zeros(1)
    return np.arange(length, dtype=np.float64) * (100.0 / (length - 1))


def normalize_trace(scores: Sequence[float], n_points: int = N_POINTS) -> np.ndarray:
    """Resample a trace onto `n_points` evenly spaced positions over 0..100 (linear interpolation)."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        raise ValueError("cannot normalise an empty trace")
    if len(scores) == 1:
        return np.full(n_points, scores[0])
    return np.interp(np.linspace(0.0, 100.0, n_points), normalized_positions(len(scores)), scores)


def end_template_start(regions: Sequence[str]) -> float:
    """Where the end template starts, in normalised units (0..100)."""
    regions = np.asarray(regions)
    start = int(_end_positions(regions)[0])
    return float(normalized_positions(len(regions))[start])


class CurveAccumulator:
    """Running mean/std of normalised traces per group (memory independent of the number of traces)."""

    def __init__(self, n_points: int = N_POINTS):
        self.n_points = n_points
        self._sum: dict[str, np.ndarray] = {}
        self._sum_sq: dict[str, np.ndarray] = {}
        self._count: dict[str, int] = {}
        self._end: dict[str, float] = {}

    def add(self, group: str, scores: Sequence[float], regions: Sequence[str]) -> None:
        curve = normalize_trace(scores, self.n_points)
        if group not in self._sum:
            self._sum[group] = np.zeros(self.n_points)
            self._sum_sq[group] = np.zeros(self.n_points)
            self._count[group] = 0
            self._end[group] = 0.0
        self._sum[group] += curve
        self._sum_sq[group] += curve * curve
        self._count[group] += 1
        self._end[group] += end_template_start(regions)

    def result(self) -> dict:
        """`{group: {x, mean, std, n, end_template_start}}` (std: population std over traces)."""
        x = np.linspace(0.0, 100.0, self.n_points)
        out = {}
        for group in sorted(self._sum):
            n = self._count[group]
            mean = self._sum[group] / n
            std = np.sqrt(np.maximum(self._sum_sq[group] / n - mean * mean, 0.0))
            out[group] = {
                "x": x.tolist(),
                "mean": mean.tolist(),
                "std": std.tolist(),
                "n": n,
                "end_template_start": self._end[group] / n,
            }
        return out


def average_curves(
    traces: Iterable[tuple[str, Sequence[float], Sequence[str]]], n_points: int = N_POINTS
) -> dict:
    """Average normalised traces per group: items are `(group, scores, regions)`; returns the
    `curves.json` structure."""
    accumulator = CurveAccumulator(n_points)
    for group, scores, regions in traces:
        accumulator.add(group, scores, regions)
    return accumulator.result()


@dataclass
class TraceInput:
    """One generations.jsonl to trace: exactly that file, its role, and optionally its labels.

    Attributes:
        generations: the generations.jsonl (read as given; never a sibling file).
        harmful: prompts are harmful (grouped complied / refused by the labels) or harmless.
        labels: labels.jsonl file(s); default: the one beside `generations` if it covers every id.
    """

    generations: Path
    harmful: bool = True
    labels: Path | Sequence[Path] | None = None


def load_trace_inputs(inputs: Sequence[TraceInput]) -> tuple[list[dict], dict[str, str]]:
    """The records to trace and each id's group, joined with labels by `labeling.join_labels`.

    Harmful inputs need labels (their group is the model's behaviour); harmless inputs do not.
    Ids must be unique across all inputs.
    """
    records: list[dict] = []
    groups: dict[str, str] = {}
    origin: dict[str, Path] = {}
    for item in inputs:
        path = Path(item.generations)
        batch = read_generations(path)
        if item.harmful:
            batch = join_labels(batch, labels_for(path, item.labels, required=True), path)
        for record in batch:
            identifier = str(record["id"])
            if identifier in origin:
                raise UserError(
                    f"id {identifier!r} is in both {origin[identifier]} and {path}; trace runs with "
                    "distinct ids (generate names them <file stem>-<row>)"
                )
            origin[identifier] = path
            groups[identifier] = group_of(item.harmful, record.get("refusal"))
            records.append(record)
    if not records:
        raise UserError("no labelled generations to trace; check --generations and --labels")
    return records, groups


# -- computing traces --------------------------------------------------------------------------


@dataclass
class TraceResult:
    """The trace(s) of one generation record.

    Attributes:
        id: the record id.
        token_ids: the probing sequence.
        regions: region of each token (prompt / thinking / end_template).
        scores_by_layer: prober layer -> refusal scores [n_tokens] (float32).
    """

    id: str
    token_ids: list[int]
    regions: list[str]
    scores_by_layer: dict[int, np.ndarray]
    direction_scores: np.ndarray | None = None  # standardised difference-in-means projections [n_tokens]

    @property
    def scores(self) -> np.ndarray:
        """The scores of the only (or shallowest) prober."""
        return self.scores_by_layer[min(self.scores_by_layer)]


def _prober_transform(weights: torch.Tensor, biases: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def transform(hidden: torch.Tensor) -> torch.Tensor:  # [batch, pos, d_model] float32
        weight = weights.to(hidden.device)  # [n_probers, d_model]
        bias = biases.to(hidden.device)  # [n_probers]
        return torch.sigmoid(hidden @ weight.T + bias)  # [batch, pos, n_probers]

    return transform


def _with_direction(transform: Callable | None, direction) -> Callable[[torch.Tensor], torch.Tensor]:
    """The layer's transform with the direction's standardised projection appended as its last column."""

    def combined(hidden: torch.Tensor) -> torch.Tensor:  # [batch, pos, d_model] float32
        projection = direction.score(hidden).unsqueeze(-1)  # [batch, pos, 1]
        if transform is None:
            return projection
        return torch.cat([transform(hidden), projection], dim=-1)  # [batch, pos, n_probers + 1]

    return combined


def trace_records_layerwise(
    loaded,
    probers: Sequence,
    records: Iterable[dict],
    batch_size: int = 8,
    sort_window: int | None = None,
    direction=None,
) -> Iterator[TraceResult]:
    """Trace every position of each record's probing sequence with one prober per layer, in one
    pass per batch stopped at the deepest prober's layer. Yields results in input order.

    With `direction` (a `prober.Direction`), its standardised projection is computed in the same
    pass (inside the hook of its layer) and returned as `direction_scores`.

    Args:
        loaded: a `models.LoadedModel`.
        probers: `prober.Prober`s, at distinct layers.
        records: generation records (generations.jsonl lines); may be a generator.
        batch_size: sequences per forward pass.
        sort_window: records tokenised, length-sorted and held together (default 32 batches).
    """
    layers = [p.layer for p in probers]
    if not probers:
        raise UserError("no prober given; train one with `refusal-cliff probe train`")
    if len(set(layers)) != len(layers):
        raise UserError(f"layer-wise tracing needs one prober per layer; got layers {layers}")
    d_model = loaded.adapter.geometry(loaded.model).d_model
    for prober in probers:
        if prober.d_model != d_model:
            raise UserError(
                f"a prober for d_model {prober.d_model} cannot read this model (d_model {d_model})"
            )
    transforms = {
        p.layer: _prober_transform(p.weight.float().reshape(1, -1), p.bias.float().reshape(1))
        for p in probers
    }
    if direction is not None:
        if direction.vector.numel() != d_model:
            raise UserError(
                f"a direction of {direction.vector.numel()} values cannot read this model (d_model {d_model})"
            )
        transforms[direction.layer] = _with_direction(transforms.get(direction.layer), direction)
        layers = sorted(set(layers) | {direction.layer})
    window = sort_window or batch_size * 32
    transforms_of_probers = {p.layer for p in probers}
    pad = loaded.tokenizer.pad_token_id or 0
    for chunk in chunked(records, window):
        tokenised = [probing_tokens(loaded.tokenizer, record) for record in chunk]
        sequences = [ids for ids, _ in tokenised]
        for index, values in iter_activations(
            loaded.model, loaded.adapter, sequences, layers, "all", batch_size, transforms, pad, window
        ):
            ids, regions = tokenised[index]
            direction_scores = None
            if direction is not None:
                direction_scores = values[direction.layer][:, -1].cpu().numpy().astype(np.float32)
            scores = {
                layer: value[:, 0].cpu().numpy().astype(np.float32)
                for layer, value in values.items()
                if layer in transforms_of_probers
            }
            yield TraceResult(str(chunk[index]["id"]), list(ids), list(regions), scores, direction_scores)


def trace_records(
    loaded,
    prober,
    records: Iterable[dict],
    batch_size: int = 8,
    sort_window: int | None = None,
    direction=None,
) -> Iterator[TraceResult]:
    """Trace each record with one prober (see `trace_records_layerwise`), and a direction if given."""
    yield from trace_records_layerwise(loaded, [prober], records, batch_size, sort_window, direction)


# -- artifacts ---------------------------------------------------------------------------------


def _parts_dir(out_dir: Path) -> Path:
    path = out_dir / TRACES
    if path.exists() and not path.is_dir():
        raise UserError(
            f"{path} is a single file, not a trace dataset folder; use another --out or delete it"
        )
    return path


def prepare_trace_outputs(out_dir: str | Path) -> set[str]:
    """Make an interrupted trace run consistent and return the ids already done.

    Parts of `traces.parquet/` are written before their `cliff.jsonl` lines; a part whose ids
    are not all in cliff.jsonl was interrupted: it is deleted, and those ids' cliff lines too,
    so they are traced again.
    """
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    parts_dir = _parts_dir(out_dir)
    done = completed_ids(out_dir / CLIFF)
    kept: set[str] = set()
    if parts_dir.is_dir():
        for stale in parts_dir.glob(".*.tmp"):
            stale.unlink()
        for part in sorted(parts_dir.glob("part-*.parquet")):
            ids = set(pq.read_table(part, columns=["id"]).column("id").to_pylist())
            if ids <= done:
                kept |= ids
            else:
                logger.warning(
                    "removing %s: written by an interrupted run, its examples are traced again", part
                )
                part.unlink()
    consistent = done & kept
    if consistent != done:
        rows = [r for r in read_jsonl(out_dir / CLIFF) if str(r.get("id")) in consistent]
        atomic_write_text(out_dir / CLIFF, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return consistent


def _write_part(parts_dir: Path, results: Sequence[TraceResult], tokenizer) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids, positions, token_ids, tokens, regions, scores = [], [], [], [], [], []
    direction_scores = [r.direction_scores for r in results if r.direction_scores is not None]
    if direction_scores and len(direction_scores) != len(results):
        raise ValueError("either every trace of a part has direction scores or none has")
    for result in results:
        n = len(result.token_ids)
        ids.extend([result.id] * n)
        positions.extend(range(n))
        token_ids.extend(result.token_ids)
        tokens.extend(tokenizer.batch_decode([[t] for t in result.token_ids]))
        regions.extend(result.regions)
        scores.append(result.scores)
    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "position": pa.array(positions, pa.int32()),
            "token_id": pa.array(token_ids, pa.int32()),
            "token": pa.array(tokens, pa.string()),
            "region": pa.array(regions, pa.string()),
            "score": pa.array(np.concatenate(scores).astype(np.float32), pa.float32()),
            **(
                {
                    "direction_score": pa.array(
                        np.concatenate(direction_scores).astype(np.float32), pa.float32()
                    )
                }
                if direction_scores
                else {}
            ),
        }
    )
    parts_dir.mkdir(parents=True, exist_ok=True)
    existing = [int(p.stem.split("-")[1]) for p in parts_dir.glob("part-*.parquet")]
    path = parts_dir / f"part-{(max(existing) + 1) if existing else 0:05d}.parquet"
    tmp = parts_dir / f".{path.name}.tmp"  # dot-files are ignored by pyarrow datasets
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def write_trace_outputs(
    out_dir: str | Path,
    results: Iterable[TraceResult],
    groups: Mapping[str, str] | None,
    tokenizer,
    plateau_method: str = "max",
    t_cliff_method: str = "last",
    window: int = DEFAULT_WINDOW,
    part_size: int = 64,
    direction_curves: bool = False,
) -> int:
    """Append traces to `traces.parquet/` (one part per `part_size` examples) and metrics to
    `cliff.jsonl`, then rewrite `curves.json` over everything in the folder. Returns the number
    of examples written. Call `prepare_trace_outputs` first and skip the ids it returns.
    `direction_curves`: also rewrite `direction_curves.json` from the `direction_score` column."""
    out_dir = Path(out_dir)
    parts_dir = _parts_dir(out_dir)
    written = 0
    with JsonlWriter(out_dir / CLIFF) as cliff:
        for chunk in chunked(results, part_size):
            _write_part(parts_dir, chunk, tokenizer)
            for result in chunk:
                row = {"id": result.id}
                metrics = cliff_metrics(result.scores, result.regions, plateau_method, t_cliff_method, window)
                # NaN is not JSON: a metric that does not exist for this trace is null
                row.update(
                    {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
                )
                row["group"] = (groups or {}).get(result.id)
                cliff.write(row)
            written += len(chunk)
            logger.info("traced %d examples", written)
    write_json(out_dir / CURVES, curves_from_outputs(out_dir))
    if direction_curves:
        write_json(out_dir / DIRECTION_CURVES, curves_from_outputs(out_dir, column="direction_score"))
    return written


def iter_saved_traces(
    out_dir: str | Path, column: str = "score"
) -> Iterator[tuple[str, np.ndarray, list[str]]]:
    """`(id, scores, regions)` of every trace in `out_dir/traces.parquet/`, one part in memory at a time
    (`column`: "score", or "direction_score" for a trace made with `--direction`)."""
    import pyarrow.parquet as pq

    parts_dir = _parts_dir(Path(out_dir))
    for part in sorted(parts_dir.glob("part-*.parquet")):
        if column not in pq.read_schema(part).names:
            raise UserError(f"{part} has no {column!r} column; trace again into a new --out")
        table = pq.read_table(part, columns=["id", "position", "region", column])
        ids = table.column("id").to_pylist()
        regions = table.column("region").to_pylist()
        scores = table.column(column).to_numpy()
        start = 0
        for stop in range(1, len(ids) + 1):
            if stop == len(ids) or ids[stop] != ids[start]:
                yield ids[start], scores[start:stop], regions[start:stop]
                start = stop


def curves_from_outputs(out_dir: str | Path, n_points: int = N_POINTS, column: str = "score") -> dict:
    """The `curves.json` structure over all traces in `out_dir`, grouped by `cliff.jsonl`'s `group`
    (of the `direction_score` column for `direction_curves.json`)."""
    out_dir = Path(out_dir)
    groups = (
        {str(r["id"]): r.get("group") for r in read_jsonl(out_dir / CLIFF)}
        if (out_dir / CLIFF).is_file()
        else {}
    )
    accumulator = CurveAccumulator(n_points)
    for trace_id, scores, regions in iter_saved_traces(out_dir, column):
        accumulator.add(groups.get(trace_id) or "all", scores, regions)
    return accumulator.result()


def trace_into(
    loaded,
    prober,
    records: Sequence[dict],
    out_dir: str | Path,
    groups: Mapping[str, str] | None = None,
    batch_size: int = 8,
    plateau_method: str = "max",
    t_cliff_method: str = "last",
    window: int = DEFAULT_WINDOW,
    part_size: int | None = None,
    progress: bool = True,
    direction=None,
    executor=None,
) -> int:
    """Trace the records not yet in `out_dir/cliff.jsonl` and write all trace artifacts (the
    resumable core of `run_trace`, also used by the clipping study).

    `executor`: an `executors.RayExecutor` computes the traces on Ray workers (shard files in
    `out_dir/shards/trace/`, the same `trace_records` per shard); the artifacts are written here, the
    same way and in the same order as with the default (this process).

    Args:
        records: generation records with unique ids; `groups` maps id -> averaging group.
        part_size: examples per `traces.parquet/part-*.parquet` file, the unit of resumption
            (default 8 batches).
        direction: a `prober.Direction` scored in the same pass (`direction_score` column,
            `direction_curves.json`).

    Returns the number of examples traced in this call (0 when everything was done already).
    """
    if plateau_method not in PLATEAU_METHODS or t_cliff_method not in T_CLIFF_METHODS:
        raise UserError(
            f"plateau method must be one of {PLATEAU_METHODS} and t_cliff method one of {T_CLIFF_METHODS}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = prepare_trace_outputs(out_dir)
    ids = [str(r["id"]) for r in records]
    if len(set(ids)) != len(ids):
        raise UserError("record ids are not unique; trace each run into its own --out folder")
    todo = [r for r in records if str(r["id"]) not in done]
    if done:
        logger.info("resuming: %d of %d examples already traced", len(records) - len(todo), len(records))
    with tqdm(
        total=len(records), initial=len(records) - len(todo), desc="trace", unit="ex", disable=not progress
    ) as bar:

        def counted(results):
            for result in results:
                yield result
                bar.update(1)

        results = run_job(
            executor,
            loaded,
            trace_job(prober, batch_size, direction),
            records,
            out_dir,
            batch_size,
            fingerprint=[
                prober.fingerprint(),
                direction.fingerprint() if direction is not None else None,
                list(records),
            ],
            skip=done,
            progress=progress,
            unit=batch_size * 32,  # trace_records' sort window: the local path's batches, its scores
        )
        written = write_trace_outputs(
            out_dir,
            counted(results),
            groups,
            loaded.tokenizer,
            plateau_method,
            t_cliff_method,
            window,
            part_size=part_size or batch_size * 8,
            direction_curves=direction is not None,
        )
        return written


def layerwise_summary(
    loaded,
    probers: Sequence,
    records: Iterable[dict],
    groups: Mapping[str, str] | None = None,
    batch_size: int = 8,
    plateau_method: str = "max",
    t_cliff_method: str = "last",
    n_points: int = N_POINTS,
    executor=None,
    out_dir: str | Path | None = None,
) -> dict:
    """The `layerwise.json` structure: `{layer: {group: {"mean": [...], "ms_mean": float}, "ms_mean": float}}`
    (top-level `ms_mean` over all examples), from one pass per batch with one prober per layer.

    With a Ray `executor`, `trace_records_layerwise` runs on its workers over shards of the records
    (`out_dir/shards/layerwise/`, deleted once read); the summary is the same."""
    accumulators = {p.layer: CurveAccumulator(n_points) for p in probers}
    ms: dict[int, dict[str, list[float]]] = {p.layer: {} for p in probers}

    records = list(records)
    results = run_job(
        executor,
        loaded,
        layerwise_job(probers, batch_size),
        records,
        out_dir,
        batch_size,
        fingerprint=[[p.fingerprint() for p in probers], records],
        progress=False,
    )
    for result in results:
        group = (groups or {}).get(result.id) or "all"
        for layer, scores in result.scores_by_layer.items():
            accumulators[layer].add(group, scores, result.regions)
            metrics = cliff_metrics(scores, result.regions, plateau_method, t_cliff_method)
            ms[layer].setdefault(group, []).append(metrics["ms"])
    summary = {}
    for layer in sorted(accumulators):
        curves = accumulators[layer].result()
        entry: dict = {
            group: {"mean": curve["mean"], "ms_mean": _nanmean(ms[layer][group])}
            for group, curve in curves.items()
        }
        every = [value for values in ms[layer].values() for value in values]
        entry["ms_mean"] = _nanmean(every)  # examples without thinking have no MS
        summary[str(layer)] = entry
    return summary


# -- thinking clipping -------------------------------------------------------------------------

DEFAULT_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def clip_thinking(tokenizer, thinking: str, fraction: float) -> tuple[str, int]:
    """The first `floor(fraction * n_tokens)` tokens of the thinking, as the exact text prefix
    they cover (cut at a token's end offset, so the text is byte-identical to the original start).

    Returns:
        (clipped thinking, number of tokens kept).
    """
    if not 0.0 <= fraction <= 1.0:
        raise UserError(f"clipping fractions must lie in [0, 1], got {fraction}")
    encoded = tokenizer(thinking, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    keep = int(math.floor(fraction * len(offsets) + 1e-9))
    if keep == 0:
        return "", 0
    if keep == len(offsets):
        return thinking, keep
    return thinking[: offsets[keep - 1][1]], keep


def clip_thinking_records(
    tokenizer, records: Iterable[dict], fractions: Sequence[float] = DEFAULT_FRACTIONS
) -> list[dict]:
    """One clipped copy of each record per fraction: thinking cut to its first fraction of TOKENS,
    the record's end template still appended. The answer is cleared (to be regenerated).

    New fields: `id` = "{id}@{fraction}", `source_id`, `clip_fraction`; `thinking_tokens` is the
    number kept.
    """
    out = []
    for record in records:
        for fraction in fractions:
            thinking, kept = clip_thinking(tokenizer, record["thinking"], float(fraction))
            clipped = dict(record)
            clipped.update(
                id=f"{record['id']}@{float(fraction):g}",
                source_id=record["id"],
                clip_fraction=float(fraction),
                thinking=thinking,
                thinking_tokens=kept,
                answer="",
                answer_tokens=0,
            )
            out.append(clipped)
    return out


def _nanmean(values: Iterable[float | None]) -> float | None:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else None


def clipping_summary(cliff_rows: Iterable[dict], refusals: Mapping[str, bool] | None = None) -> list[dict]:
    """The `clipping.json` structure: per fraction `{fraction, final_mean, ms_mean, drop_mean,
    refusal_rate, n}` from the cliff rows of clipped records (fraction from `clip_fraction`, else
    from the "{id}@{fraction}" id); refusal_rate from the labels of the regenerated answers, keyed
    by the clipped id (None without labels)."""
    by_fraction: dict[float, list[dict]] = {}
    for row in cliff_rows:
        fraction = row.get("clip_fraction")
        if fraction is None:
            if "@" not in str(row["id"]):
                raise UserError(f"cliff row {row['id']!r} is not from a clipped record (no clip_fraction)")
            fraction = str(row["id"]).rsplit("@", 1)[1]
        by_fraction.setdefault(float(fraction), []).append(row)
    summary = []
    for fraction in sorted(by_fraction):
        rows = by_fraction[fraction]
        labelled = [refusals[str(r["id"])] for r in rows if refusals and str(r["id"]) in refusals]
        summary.append(
            {
                "fraction": fraction,
                "final_mean": _nanmean(r["final"] for r in rows),
                "ms_mean": _nanmean(r["ms"] for r in rows),
                "drop_mean": _nanmean(r["drop"] for r in rows),
                "refusal_rate": float(np.mean(labelled)) if labelled else None,
                "n": len(rows),
            }
        )
    return summary

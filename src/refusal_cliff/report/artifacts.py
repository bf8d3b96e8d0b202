"""Reading a run folder's artifacts for the report: where they are, what they hold, and checks.

Why a module of its own: the artifacts are the contract between stages (docs/artifacts.md).
Each one has a schema here (a TypedDict of what the loader returns), one loader that checks
the file against the schema the writing stage uses, and one entry in `ARTIFACTS` saying where
to look for it and which command writes it. A loader does not guess at other formats: a file
that does not follow its schema is a `UserError` naming the field (a wrong report is worse
than none). A stage that writes an artifact can import its TypedDict from here.

To add an artifact field: add it to the TypedDict and to its loader. To add an artifact: a
TypedDict, a loader and an `Artifact` entry in `ARTIFACTS`; a section then names it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from refusal_cliff.core.errors import UserError
from refusal_cliff.core.runs import read_json, read_jsonl

logger = logging.getLogger(__name__)

PROBER_QUALITIES = ("reliable", "unreliable")


# -- checks ---------------------------------------------------------------------------------


def _num(value: Any, where: str, optional: bool = False) -> float | None:
    """A JSON number as float; None passes when `optional`. Anything else is a UserError."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where} must be a number, got {value!r:.60}; regenerate the artifact")
    return float(value)


def _int(value: Any, where: str, optional: bool = False) -> int | None:
    number = _num(value, where, optional)
    return None if number is None else int(number)


def _numbers(value: Any, where: str) -> list[float]:
    """A non-empty list of numbers (a JSON null, written for NaN, becomes NaN)."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{where} must be a non-empty list of numbers; regenerate the artifact")
    return [math.nan if v is None else _num(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _expect(obj: Any, kind: type, where: str) -> Any:
    if not isinstance(obj, kind):
        expected = {dict: "an object", list: "a list", str: "a string"}.get(kind, kind.__name__)
        raise UserError(f"{where} must be {expected}, got {type(obj).__name__}; regenerate the artifact")
    return obj


def _flag(value: Any, where: str) -> bool | None:
    """A JSON boolean or null."""
    if value is not None and not isinstance(value, bool):
        raise UserError(f"{where} must be true, false or null; regenerate the artifact")
    return value


def _records(path: Path, jsonl: bool) -> list[tuple[str, dict]]:
    """(where, record) for each object of a JSON list or JSONL file."""
    if jsonl:
        data = read_jsonl(path)
        places = [f"{path} line {i + 1}" for i in range(len(data))]
    else:
        data = _expect(read_json(path), list, str(path))
        places = [f"{path}: [{i}]" for i in range(len(data))]
    return [(where, _expect(entry, dict, where)) for where, entry in zip(places, data)]


# -- schemas and loaders --------------------------------------------------------------------


def load_notes(path: Path) -> dict:
    """demo.json → its free-form key/values."""
    return _expect(read_json(path), dict, str(path))


class EpochRecord(TypedDict):
    epoch: int
    train_loss: float | None
    val_loss: float | None
    val_accuracy: float | None
    ood_accuracy: float | None


class Prober(TypedDict):
    """prober.json (written by `probe train`). `quality` is absent (None) for older probers."""

    model_id: str | None
    model_revision: str | None
    architecture: str | None
    layer: int | None
    n_layers: int | None
    d_model: int | None
    final_norm_applied: bool | None
    end_template: str | None
    metrics: dict  # numbers; `val_accuracy_ci95` is [lo, hi]
    history: list[EpochRecord]
    quality: str | None  # "reliable" | "unreliable"
    quality_reasons: list[str]


def _prober_metrics(metrics: dict, where: str) -> dict:
    clean = {}
    for key, value in metrics.items():
        if key == "val_accuracy_ci95":
            interval = _numbers(value, f"{where}.{key}")
            if len(interval) != 2:
                raise UserError(f"{where}.{key} must be [lo, hi]; regenerate the prober")
            clean[key] = interval
        else:
            _num(value, f"{where}.{key}", optional=True)
            clean[str(key)] = value  # ints (epochs, counts) stay ints for display
    return clean


def _prober_quality(data: dict, where: str) -> tuple[str | None, list[str]]:
    quality = data.get("quality")
    if quality is not None and quality not in PROBER_QUALITIES:
        raise UserError(f"{where}: 'quality' must be one of {PROBER_QUALITIES}, got {quality!r:.40}")
    reasons = _expect(data.get("quality_reasons") or [], list, f"{where}: 'quality_reasons'")
    return quality, [
        str(_expect(reason, str, f"{where}: quality_reasons[{i}]")) for i, reason in enumerate(reasons)
    ]


def load_prober(path: Path) -> Prober:
    """prober.json → `Prober`, metrics and history checked."""
    data = _expect(read_json(path), dict, str(path))
    history: list[EpochRecord] = []
    for index, entry in enumerate(_expect(data.get("history") or [], list, f"{path}: 'history'")):
        where = f"{path}: history[{index}]"
        _expect(entry, dict, where)
        history.append(
            EpochRecord(
                epoch=_int(entry.get("epoch"), f"{where}.epoch"),
                **{
                    key: _num(entry.get(key), f"{where}.{key}", optional=True)
                    for key in ("train_loss", "val_loss", "val_accuracy", "ood_accuracy")
                },
            )
        )
    quality, reasons = _prober_quality(data, str(path))
    return Prober(
        **{
            key: data.get(key)
            for key in (
                "model_id",
                "model_revision",
                "architecture",
                "layer",
                "n_layers",
                "d_model",
                "final_norm_applied",
                "end_template",
            )
        },
        metrics=_prober_metrics(
            _expect(data.get("metrics") or {}, dict, f"{path}: 'metrics'"), f"{path}: metrics"
        ),
        history=history,
        quality=quality,
        quality_reasons=reasons,
    )


class Curve(TypedDict):
    x: list[float]
    mean: list[float]
    std: list[float] | None
    n: int | None
    end_template_start: float | None


def load_curves(path: Path) -> dict[str, Curve]:
    """curves.json → {group: `Curve`}."""
    curves = {}
    for group, entry in _expect(read_json(path), dict, str(path)).items():
        where = f"{path}: group {group!r}"
        _expect(entry, dict, where)
        mean = _numbers(entry.get("mean"), f"{where} 'mean'")
        x = _numbers(entry.get("x"), f"{where} 'x'")
        std = _numbers(entry["std"], f"{where} 'std'") if entry.get("std") is not None else None
        if len(x) != len(mean) or (std is not None and len(std) != len(mean)):
            raise UserError(f"{where}: 'x', 'mean' and 'std' must have the same length; regenerate it")
        curves[str(group)] = Curve(
            x=x,
            mean=mean,
            std=std,
            n=_int(entry.get("n"), f"{where} 'n'", optional=True),
            end_template_start=_num(
                entry.get("end_template_start"), f"{where} 'end_template_start'", optional=True
            ),
        )
    return curves


class CliffRow(TypedDict):
    id: str
    group: str
    plateau: float | None
    final: float | None
    ms: float | None
    t_cliff: int | None
    drop: float | None


def _cliff_metrics(record: dict, where: str) -> dict:
    """plateau, final, ms, t_cliff, drop of a cliff.jsonl / scores.jsonl line (each may be null).

    `ms` is plateau − final when the key is absent and both exist.
    """
    plateau = _num(record.get("plateau"), f"{where}: 'plateau'", optional=True)
    final = _num(record.get("final"), f"{where}: 'final'", optional=True)
    ms = _num(record.get("ms"), f"{where}: 'ms'", optional=True)
    if ms is None and plateau is not None and final is not None:
        ms = plateau - final
    return {
        "plateau": plateau,
        "final": final,
        "ms": ms,
        "t_cliff": _int(record.get("t_cliff"), f"{where}: 't_cliff'", optional=True),
        "drop": _num(record.get("drop"), f"{where}: 'drop'", optional=True),
    }


def _require_id(record: dict, where: str, command: str) -> str:
    if "id" not in record:
        raise UserError(f"{where}: missing 'id'; regenerate it with `{command}`")
    return str(record["id"])


def load_cliff(path: Path) -> list[CliffRow]:
    """cliff.jsonl → [`CliffRow`]; a metric that does not exist for a trace is null."""
    return [
        CliffRow(
            id=_require_id(record, where, "refusal-cliff trace"),
            group=str(record.get("group") or "all"),
            **_cliff_metrics(record, where),
        )
        for where, record in _records(path, jsonl=True)
    ]


class LayerwiseLayer(TypedDict):
    groups: dict[str, list[float]]  # group → mean normalised trace
    group_ms_mean: dict[str, float | None]
    ms_mean: float | None  # over all groups


def _layer_sort_key(name: str) -> tuple[int, str]:
    digits = re.findall(r"-?\d+", name)
    return (int(digits[-1]) if digits else 1 << 30, name)


def load_layerwise(path: Path) -> dict[str, LayerwiseLayer]:
    """layerwise.json `{layer: {group: {"mean", "ms_mean"}, "ms_mean"}}` → {layer: `LayerwiseLayer`}, by depth."""
    layers: dict[str, LayerwiseLayer] = {}
    for layer, entry in _expect(read_json(path), dict, str(path)).items():
        where = f"{path}: layer {layer!r}"
        groups = {
            str(key): _expect(value, dict, f"{where} group {key!r}")
            for key, value in _expect(entry, dict, where).items()
            if key != "ms_mean"
        }
        layers[str(layer)] = LayerwiseLayer(
            groups={g: _numbers(v.get("mean"), f"{where} group {g!r} 'mean'") for g, v in groups.items()},
            group_ms_mean={
                g: _num(v.get("ms_mean"), f"{where} group {g!r} 'ms_mean'", optional=True)
                for g, v in groups.items()
            },
            ms_mean=_num(entry.get("ms_mean"), f"{where} 'ms_mean'", optional=True),
        )
    return {name: layers[name] for name in sorted(layers, key=_layer_sort_key)}


def _load_rows(path: Path, fields: dict[str, bool], sort_key: str) -> list[dict]:
    """A JSON list of flat records; `fields` maps each numeric field to whether it is required."""
    rows = []
    for where, entry in _records(path, jsonl=False):
        row = dict(entry)
        for key, required in fields.items():
            row[key] = _num(entry.get(key), f"{where}.{key}", optional=not required)
        rows.append(row)
    return sorted(rows, key=lambda r: r[sort_key])


class ClippingRow(TypedDict):
    fraction: float
    final_mean: float | None
    ms_mean: float | None
    drop_mean: float | None
    refusal_rate: float | None
    n: float | None


def load_clipping(path: Path) -> list[ClippingRow]:
    """clipping.json → rows sorted by `fraction`."""
    return _load_rows(
        path,
        {
            "fraction": True,
            "final_mean": False,
            "ms_mean": False,
            "drop_mean": False,
            "refusal_rate": False,
            "n": False,
        },
        "fraction",
    )


class HeadRow(TypedDict):
    layer: int
    head: int
    contribution: float | None
    contribution_exact: float | None
    std: float | None
    rank: int | None
    value: float  # contribution, else contribution_exact


def load_heads(path: Path) -> list[HeadRow]:
    """heads.json → `HeadRow`s, most negative `value` first."""
    rows = _load_rows(
        path,
        {
            "layer": True,
            "head": True,
            "contribution": False,
            "contribution_exact": False,
            "std": False,
            "rank": False,
        },
        "layer",
    )
    for index, row in enumerate(rows):
        row["layer"], row["head"] = int(row["layer"]), int(row["head"])
        row["rank"] = None if row["rank"] is None else int(row["rank"])
        row["value"] = row["contribution"] if row["contribution"] is not None else row["contribution_exact"]
        if row["value"] is None:
            raise UserError(f"{path}: [{index}] has neither 'contribution' nor 'contribution_exact'")
    return sorted(rows, key=lambda r: r["value"])


class AblationRow(TypedDict):
    threshold: float
    n_heads: int | None
    gamma: float | None
    renormalize: bool
    control: str  # "none" (the unablated baseline), "ranked", "random" or "boost"
    seed: int | None  # the random control's seed
    boost_others: float | None  # the boosting control's factor
    final_score_mean: float | None
    asr: float | None
    benign_refusal_rate: float | None
    n_harmful: int | None
    n_benign: int | None


def load_ablation(path: Path) -> list[AblationRow]:
    """ablation.json → rows sorted by `threshold` (fraction of all heads)."""
    fields = {
        "threshold": True,
        "gamma": False,
        "final_score_mean": False,
        "asr": False,
        "benign_refusal_rate": False,
        "n_harmful": False,
        "n_benign": False,
    }
    rows = _load_rows(path, fields, "threshold")
    for row in rows:
        heads = row.get("heads")
        row["n_heads"] = len(heads) if isinstance(heads, list) else None
        row["renormalize"] = bool(row.get("renormalize", False))
        for key in ("n_harmful", "n_benign"):
            row[key] = None if row[key] is None else int(row[key])
        control = row.get("control")  # absent in runs made before the controls existed
        if control is None:
            control = "none" if not heads and row["threshold"] == 0 else "ranked"
        if control not in ABLATION_CONTROLS:
            raise UserError(f"{path}: 'control' must be one of {ABLATION_CONTROLS}, got {control!r:.40}")
        row["control"] = control
        row["seed"] = _int(row.get("seed"), f"{path}: seed", optional=True)
        row["boost_others"] = _num(row.get("boost_others"), f"{path}: boost_others", optional=True)
    return rows


ABLATION_CONTROLS = ("none", "ranked", "random", "boost")


class PatternHead(TypedDict):
    layer: int
    head: int
    rank: int | None
    contribution: float | None
    prompt: float
    thinking: float
    end_template: float


class Patterns(TypedDict):
    """patterns.json (written by `heads --patterns K`)."""

    heads: list[list[int]]
    top: int
    mass_mean: list[PatternHead]  # per head, its attention mass per region, mean over examples
    examples: list[dict]  # per example: id, n_tokens, heads [{layer, head, mass, top: [...]}]
    heatmap: dict | None  # one example: id, tokens, regions, weights [[...] per head]


def load_patterns(path: Path) -> Patterns:
    """patterns.json → `Patterns`, the per-region masses and the heat map checked."""
    data = _expect(read_json(path), dict, str(path))
    mass = []
    for index, entry in enumerate(_expect(data.get("mass_mean") or [], list, f"{path}: 'mass_mean'")):
        where = f"{path}: mass_mean[{index}]"
        _expect(entry, dict, where)
        mass.append(
            PatternHead(
                layer=_int(entry.get("layer"), f"{where}.layer"),
                head=_int(entry.get("head"), f"{where}.head"),
                rank=_int(entry.get("rank"), f"{where}.rank", optional=True),
                contribution=_num(entry.get("contribution"), f"{where}.contribution", optional=True),
                **{
                    region: _num(entry.get(region), f"{where}.{region}")
                    for region in ("prompt", "thinking", "end_template")
                },
            )
        )
    heatmap = data.get("heatmap")
    if heatmap is not None:
        _expect(heatmap, dict, f"{path}: 'heatmap'")
        tokens = _expect(heatmap.get("tokens"), list, f"{path}: heatmap.tokens")
        regions = _expect(heatmap.get("regions"), list, f"{path}: heatmap.regions")
        weights = [
            _numbers(row, f"{path}: heatmap.weights[{i}]")
            for i, row in enumerate(_expect(heatmap.get("weights"), list, f"{path}: heatmap.weights"))
        ]
        if (
            len(tokens) != len(regions)
            or any(len(row) != len(tokens) for row in weights)
            or len(weights) != len(mass)
        ):
            raise UserError(f"{path}: the heat map's tokens, regions and weights do not match; regenerate it")
        heatmap = {
            "id": str(heatmap.get("id")),
            "tokens": [str(t) for t in tokens],
            "regions": [str(r) for r in regions],
            "weights": weights,
        }
    return Patterns(
        heads=[list(map(int, h)) for h in _expect(data.get("heads") or [], list, f"{path}: 'heads'")],
        top=_int(data.get("top"), f"{path}: 'top'", optional=True) or 0,
        mass_mean=mass,
        examples=_expect(data.get("examples") or [], list, f"{path}: 'examples'"),
        heatmap=heatmap,
    )


class DirectionLayer(TypedDict):
    norm: float
    cosine_to_prober: float | None
    projection_mean: float
    projection_std: float
    refused_mean: float | None
    complied_mean: float | None
    accuracy: float | None


class Directions(TypedDict):
    """directions.json (written by `probe direction`)."""

    model_id: str | None
    prober_layer: int | None
    n_refused: int | None
    n_complied: int | None
    layers: dict[str, DirectionLayer]  # by depth


def load_directions(path: Path) -> Directions:
    """directions.json → `Directions`, layers by depth."""
    data = _expect(read_json(path), dict, str(path))
    layers = {}
    for layer, entry in _expect(data.get("layers"), dict, f"{path}: 'layers'").items():
        where = f"{path}: layers[{layer!r}]"
        _expect(entry, dict, where)
        layers[str(layer)] = DirectionLayer(
            norm=_num(entry.get("norm"), f"{where}.norm"),
            projection_mean=_num(entry.get("projection_mean"), f"{where}.projection_mean"),
            projection_std=_num(entry.get("projection_std"), f"{where}.projection_std"),
            **{
                key: _num(entry.get(key), f"{where}.{key}", optional=True)
                for key in ("cosine_to_prober", "refused_mean", "complied_mean", "accuracy")
            },
        )
    return Directions(
        model_id=data.get("model_id"),
        prober_layer=_int(data.get("prober_layer"), f"{path}: prober_layer", optional=True),
        n_refused=_int(data.get("n_refused"), f"{path}: n_refused", optional=True),
        n_complied=_int(data.get("n_complied"), f"{path}: n_complied", optional=True),
        layers={name: layers[name] for name in sorted(layers, key=_layer_sort_key)},
    )


class GuardRow(TypedDict):
    tau: float | None  # None: the unguarded model
    rule: str | None
    action: str | None
    asr: float | None
    benign_refusal_rate: float | None
    flag_rate_harmful: float | None
    flag_rate_benign: float | None
    n: int | None
    n_harmful: int | None
    n_benign: int | None


def load_guard(path: Path) -> list[GuardRow]:
    """guard.json → the unguarded row (tau null) first, then rows sorted by `tau`."""
    rows = []
    for where, entry in _records(path, jsonl=False):
        row = dict(entry)
        for key in ("tau", "asr", "benign_refusal_rate", "flag_rate_harmful", "flag_rate_benign"):
            row[key] = _num(entry.get(key), f"{where}.{key}", optional=True)
        for key in ("n", "n_harmful", "n_benign"):
            row[key] = _int(entry.get(key), f"{where}.{key}", optional=True)
        for key in ("rule", "action"):
            row[key] = None if entry.get(key) is None else str(entry.get(key))
        rows.append(row)
    return sorted(rows, key=lambda r: (r["tau"] is not None, r["tau"] or 0.0))


class ComponentRow(TypedDict):
    name: str
    kind: str
    component_class: str
    layer: int | None
    head: int | None
    t_cliff_mean: float
    t_cliff_std: float | None
    change_mean: float
    change_std: float | None
    per_token_mean: list[float]
    rank: int


def load_components(path: Path) -> dict:
    """components.json (written by `components`) → the summary, its `components` checked and sorted
    by their mean change across the end template (most negative first)."""
    data = _expect(read_json(path), dict, str(path))
    for key in ("by_class", "by_layer", "components", "logit"):
        if key not in data:
            raise UserError(f"{path}: missing '{key}'; regenerate it with `refusal-cliff components`")
    rows = []
    for index, entry in enumerate(_expect(data["components"], list, f"{path}: 'components'")):
        where = f"{path}: components[{index}]"
        row = dict(_expect(entry, dict, where))
        for key in ("t_cliff_mean", "change_mean"):
            row[key] = _num(entry.get(key), f"{where}.{key}")
        for key in ("t_cliff_std", "change_std"):
            row[key] = _num(entry.get(key), f"{where}.{key}", optional=True)
        row["per_token_mean"] = _numbers(entry.get("per_token_mean"), f"{where}.per_token_mean")
        row["name"], row["kind"] = str(entry.get("name")), str(entry.get("kind"))
        rows.append(row)
    data["components"] = sorted(rows, key=lambda r: r["change_mean"])
    for key in ("change_mean", "last_thinking_mean", "t_cliff_mean"):
        data["logit"][key] = _num(data["logit"].get(key), f"{path}: logit.{key}")
    return data


class ComponentAblationRow(TypedDict):
    condition: str
    components: list[str]
    gamma: float | None
    final_score_mean: float | None
    asr: float | None
    benign_refusal_rate: float | None
    n_harmful: int | None
    n_benign: int | None


def load_component_ablation(path: Path) -> list[ComponentAblationRow]:
    """component_ablation.json (written by `ablate --components`) → rows in the order measured."""
    rows = []
    for where, entry in _records(path, jsonl=False):
        row = dict(entry)
        row["condition"] = str(entry.get("condition"))
        row["components"] = [str(c) for c in entry.get("components") or []]
        for key in ("gamma", "final_score_mean", "asr", "benign_refusal_rate"):
            row[key] = _num(entry.get(key), f"{where}.{key}", optional=True)
        for key in ("n_harmful", "n_benign"):
            row[key] = _int(entry.get(key), f"{where}.{key}", optional=True)
        rows.append(row)
    return rows


class EvaluatedModel(TypedDict):
    model: str
    method: str | None
    k: float | None
    asr: float | None
    over_refusal: float | None
    final_score_mean: float | None
    tasks: dict[str, float | None]  # task → accuracy


class AsrPoint(TypedDict):
    k: float
    asr: float


class Evaluation(TypedDict):
    models: list[EvaluatedModel]
    asr_vs_k: dict[str, list[AsrPoint]]  # method → points sorted by k


def _task_accuracies(tasks: dict, where: str) -> dict[str, float | None]:
    """{task: {"accuracy": float, ...}} (as `evaluate` writes it) → {task: accuracy}."""
    return {
        str(task): _num(
            _expect(value, dict, f"{where}.{task}").get("accuracy"), f"{where}.{task}.accuracy", optional=True
        )
        for task, value in tasks.items()
    }


def _evaluated_model(entry: dict, where: str) -> EvaluatedModel:
    return EvaluatedModel(
        model=str(entry.get("model", where)),
        method=None if entry.get("method") is None else str(entry["method"]),
        k=_num(entry.get("k"), f"{where}.k", optional=True),
        **{
            key: _num(entry.get(key), f"{where}.{key}", optional=True)
            for key in ("asr", "over_refusal", "final_score_mean")
        },
        tasks=_task_accuracies(_expect(entry.get("tasks") or {}, dict, f"{where}.tasks"), f"{where}.tasks"),
    )


def _asr_points(points: Any, where: str) -> list[AsrPoint]:
    rows = [_expect(p, dict, f"{where}[{i}]") for i, p in enumerate(_expect(points, list, where))]
    return sorted(
        (
            AsrPoint(k=_num(p.get("k"), f"{where}[{i}].k"), asr=_num(p.get("asr"), f"{where}[{i}].asr"))
            for i, p in enumerate(rows)
        ),
        key=lambda p: p["k"],
    )


def load_evaluation(path: Path) -> Evaluation:
    """evaluation.json `{"models": [...], "asr_vs_k": {method: [{k, asr}, ...]}}` → `Evaluation`."""
    data = _expect(read_json(path), dict, str(path))
    models = [
        _evaluated_model(_expect(entry, dict, f"{path}: models[{i}]"), f"{path}: models[{i}]")
        for i, entry in enumerate(_expect(data.get("models") or [], list, f"{path}: 'models'"))
    ]
    raw = _expect(data.get("asr_vs_k") or {}, dict, f"{path}: 'asr_vs_k'")
    asr_vs_k = {
        str(method): _asr_points(points, f"{path}: asr_vs_k[{method!r}]") for method, points in raw.items()
    }
    return Evaluation(models=models, asr_vs_k=asr_vs_k)


class ScoreRow(TypedDict):
    """A scores.jsonl line (written by `select`): one per candidate."""

    id: str
    plateau: float | None
    final: float | None
    ms: float | None  # null for a candidate without thinking tokens
    t_cliff: int | None
    drop: float | None
    refusal: bool | None
    unsafe: bool | None


def load_scores(path: Path) -> list[ScoreRow]:
    """scores.jsonl → [`ScoreRow`]."""
    return [
        ScoreRow(
            id=_require_id(record, where, "refusal-cliff select"),
            **_cliff_metrics(record, where),
            refusal=_flag(record.get("refusal"), f"{where}: 'refusal'"),
            unsafe=_flag(record.get("unsafe"), f"{where}: 'unsafe'"),
        )
        for where, record in _records(path, jsonl=True)
    ]


class SelectedRow(TypedDict):
    """A selection.jsonl line (written by `select`): the fields the report shows."""

    id: str
    rank: int
    method: str
    ms: float | None
    plateau: float | None
    final: float | None
    refusal: bool | None
    unsafe: bool | None
    prompt: str


def load_selection(path: Path) -> list[SelectedRow]:
    """selection.jsonl → [`SelectedRow`] by rank."""
    rows = []
    for where, record in _records(path, jsonl=True):
        rows.append(
            SelectedRow(
                id=_require_id(record, where, "refusal-cliff select"),
                rank=_int(record.get("rank"), f"{where}: 'rank'"),
                method=str(_expect(record.get("method"), str, f"{where}: 'method'")),
                **{
                    key: _num(record.get(key), f"{where}: '{key}'", optional=True)
                    for key in ("ms", "plateau", "final")
                },
                refusal=_flag(record.get("refusal"), f"{where}: 'refusal'"),
                unsafe=_flag(record.get("unsafe"), f"{where}: 'unsafe'"),
                prompt=str(_expect(record.get("prompt"), str, f"{where}: 'prompt'")),
            )
        )
    return sorted(rows, key=lambda r: r["rank"])


class SelectMetadata(TypedDict):
    """metadata.select.json (written by `select`): the selection's settings and counts."""

    method: str
    k: Any  # as given: an int, a fraction, a string such as "10%", or null (full set)
    resolved_k: int | None
    n_candidates: int
    n_selected: int
    ms_mean_selected: float | None
    ms_mean_all: float | None


def load_select_metadata(path: Path) -> SelectMetadata:
    """metadata.select.json → `SelectMetadata`."""
    data = _expect(read_json(path), dict, str(path))
    return SelectMetadata(
        method=str(_expect(data.get("method"), str, f"{path}: 'method'")),
        k=data.get("k"),
        resolved_k=_int(data.get("resolved_k"), f"{path}: 'resolved_k'", optional=True),
        n_candidates=_int(data.get("n_candidates"), f"{path}: 'n_candidates'"),
        n_selected=_int(data.get("n_selected"), f"{path}: 'n_selected'"),
        **{
            key: _num(data.get(key), f"{path}: '{key}'", optional=True)
            for key in ("ms_mean_selected", "ms_mean_all")
        },
    )


# -- where artifacts are --------------------------------------------------------------------


# -- traces.parquet: checked whole, read per example ------------------------------------------

TRACE_COLUMNS = ("id", "position", "token", "region", "score")


class TraceToken(TypedDict):
    position: int
    token: str
    region: str
    score: float


def load_traces(path: Path) -> Path:
    """traces.parquet (a file, or a folder of parquet parts as `trace` writes it): its schema is
    checked here; its rows (one per token of every example, millions in a large run) are read only
    for the examples a section shows, by `read_trace_tokens`."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    try:
        names = set(ds.dataset(path, format="parquet").schema.names)
    except (OSError, pa.ArrowException) as exc:
        raise UserError(
            f"{path}: not a readable parquet file ({exc}); re-run `refusal-cliff trace`"
        ) from None
    missing = [name for name in TRACE_COLUMNS if name not in names]
    if missing:
        raise UserError(f"{path}: no column {', '.join(missing)}; re-run `refusal-cliff trace`")
    return path


def read_trace_tokens(path: Path, ids: list[str]) -> dict[str, list[TraceToken]]:
    """{id: its tokens in position order} for `ids` (an id the file lacks is absent)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=list(TRACE_COLUMNS), filters=[("id", "in", list(ids))])
    except (OSError, pa.ArrowException) as exc:
        raise UserError(
            f"{path}: not a readable parquet file ({exc}); re-run `refusal-cliff trace`"
        ) from None
    tokens: dict[str, list[TraceToken]] = {}
    for row in table.to_pylist():
        score = _num(row["score"], f"{path}: score of {row['id']} at {row['position']}", optional=True)
        tokens.setdefault(str(row["id"]), []).append(
            TraceToken(
                position=int(row["position"]), token=str(row["token"]), region=str(row["region"]), score=score
            )
        )
    for rows in tokens.values():
        rows.sort(key=lambda token: token["position"])
    return tokens


@dataclass(frozen=True)
class Artifact:
    """An artifact the report reads: its file name, loader, the command that writes it, and how
    many folder levels below the run folder it may be (a demo run has `probe/`, `trace/`, ...
    sub-folders, and `repair/select/`)."""

    name: str
    load: Callable[[Path], Any]
    command: str
    depth: int = 1
    folder: bool = False  # may be a folder (a parquet dataset of parts)


ARTIFACTS: dict[str, Artifact] = {
    a.name: a
    for a in (
        Artifact("demo.json", load_notes, "refusal-cliff demo"),
        Artifact("prober.json", load_prober, "refusal-cliff probe train"),
        Artifact("curves.json", load_curves, "refusal-cliff trace"),
        Artifact("cliff.jsonl", load_cliff, "refusal-cliff trace"),
        Artifact("traces.parquet", load_traces, "refusal-cliff trace", folder=True),
        Artifact("layerwise.json", load_layerwise, "refusal-cliff layers"),
        Artifact("clipping.json", load_clipping, "refusal-cliff clip"),
        Artifact("heads.json", load_heads, "refusal-cliff heads"),
        Artifact("ablation.json", load_ablation, "refusal-cliff ablate"),
        Artifact("patterns.json", load_patterns, "refusal-cliff heads --patterns K"),
        Artifact("directions.json", load_directions, "refusal-cliff probe direction"),
        Artifact("direction_curves.json", load_curves, "refusal-cliff trace --direction"),
        Artifact("components.json", load_components, "refusal-cliff components"),
        Artifact("component_ablation.json", load_component_ablation, "refusal-cliff ablate --components"),
        Artifact("evaluation.json", load_evaluation, "refusal-cliff evaluate"),
        Artifact("guard.json", load_guard, "refusal-cliff guard"),
        Artifact("scores.jsonl", load_scores, "refusal-cliff select", depth=2),
        Artifact("selection.jsonl", load_selection, "refusal-cliff select", depth=2),
        Artifact("metadata.select.json", load_select_metadata, "refusal-cliff select", depth=2),
    )
}
PROBER_SEARCH_DEPTH = 2  # every prober.json this deep is checked for its quality (layer-study probers too)


def find_artifacts(run_dir: Path, name: str, depth: int = 1, folder_ok: bool = False) -> list[Path]:
    """Every `name` in `run_dir` and the sub-folders up to `depth` levels below, shallowest first
    (then by folder name); a folder of that name counts when `folder_ok`."""
    found, folders = [], [run_dir]
    for _ in range(depth + 1):
        found += [
            folder / name
            for folder in folders
            if (folder / name).is_file() or (folder_ok and (folder / name).is_dir())
        ]
        folders = [
            sub
            for folder in folders
            for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        ]
    return found


@dataclass
class RunArtifacts:
    """Everything a run folder holds for the report, parsed and checked."""

    run_dir: Path
    data: dict[str, Any] = field(default_factory=dict)  # artifact name → parsed content
    paths: dict[str, Path] = field(default_factory=dict)  # artifact name → the file it was read from
    # generations.jsonl path → {id: record}, and → {id: label} from the labels.jsonl beside it
    generations: dict[Path, dict[str, dict]] = field(default_factory=dict)
    labels: dict[Path, dict[str, dict]] = field(default_factory=dict)
    probers: dict[Path, Prober] = field(default_factory=dict)  # every prober.json, for their quality

    def get(self, name: str) -> tuple[Path | None, Any]:
        return self.paths.get(name), self.data.get(name)


def _by_id(path: Path) -> dict[str, dict]:
    records = {}
    for _, record in _records(path, jsonl=True):
        records.setdefault(str(record.get("id")), record)
    return records


def load_run(run_dir: str | Path) -> RunArtifacts:
    """Find and parse every artifact the report uses, before anything is drawn or written.

    Each artifact is the shallowest one found (see `find_artifacts`). Every generations.jsonl
    directly in the run folder or a sub-folder is read (with the labels.jsonl beside it), since
    examples are joined to their texts by id. Raises UserError for a malformed artifact.
    """
    run_dir = Path(run_dir)
    artifacts = RunArtifacts(run_dir)
    for artifact in ARTIFACTS.values():
        paths = find_artifacts(run_dir, artifact.name, artifact.depth, artifact.folder)
        if len(paths) > 1:
            logger.warning("several %s found; using %s", artifact.name, paths[0])
        if paths:
            artifacts.paths[artifact.name] = paths[0]
            artifacts.data[artifact.name] = artifact.load(paths[0])
    for path in find_artifacts(run_dir, "prober.json", PROBER_SEARCH_DEPTH):
        same = path == artifacts.paths.get("prober.json")
        artifacts.probers[path] = artifacts.data["prober.json"] if same else load_prober(path)
    for path in find_artifacts(run_dir, "generations.jsonl"):
        artifacts.generations[path] = _by_id(path)
        label_path = path.parent / "labels.jsonl"
        artifacts.labels[path] = _by_id(label_path) if label_path.is_file() else {}
    return artifacts

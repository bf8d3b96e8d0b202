"""Plots and the self-contained HTML report of a run folder.

The other stages leave numbers in artifacts (docs/artifacts.md); this module turns
whatever a run folder holds into the paper's figures and tables, so that a run can be
read without a notebook: the prober's training history (Figure 3), averaged refusal-score
traces with the end-template region shaded (Figure 4), the examples with the largest
misalignment score, layer-wise traces, plateau vs harmless scores and thinking clipping
(Figure 5), per-head contributions (Figure 6), head ablation (Figure 8) and the
fine-tuning evaluation (Table 2, Figure 7).

Design points:

- The report renders what exists. Each section needs some artifacts; a missing one only
  removes that section, and the report lists the skipped sections and why at the top.
  A run folder's immediate sub-folders are searched too (a demo run has `probe/`,
  `trace/`, ... sub-folders). A *malformed* artifact is a `UserError`: a wrong report is
  worse than none.
- Model outputs and dataset prompts are untrusted text that can hold markup. Every
  string that is not built here goes through `html.escape` (`_e`); trusted fragments are
  wrapped in `_Html`, and the table helper escapes every cell that is not `_Html`
  (autoescaping by construction). Long texts are truncated *before* escaping (so an
  entity is never cut in half) with a "…" marker.
- The HTML has no external URLs: CSS is inline and plots are base64 PNGs. Every plot is
  also written as `fig_*.png`, and `summary.json` holds every number the report shows.
- Plot functions take plain data and return a `matplotlib.figure.Figure` (Agg canvas, no
  pyplot global state), so other stages can save their own PNGs with `save_figure`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from . import __version__
from .errors import UserError
from .runs import atomic_write_text, read_json, read_jsonl, write_json

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
SUMMARY_NAME = "summary.json"
FIGURE_DPI = 110
END_TEMPLATE_COLOR = "orange"
HARMLESS_GROUP_WORDS = ("harmless", "benign", "normal")

# Truncation limits (characters) for the examples table.
PROMPT_CHARS = 500
THINKING_CHARS = 1200
ANSWER_CHARS = 600
NOTE_CHARS = 2000

FIGURE_NAMES = ("fig_prober.png", "fig_traces.png", "fig_layerwise.png", "fig_plateau.png",
                "fig_clipping.png", "fig_heads.png", "fig_ablation.png", "fig_asr_vs_k.png")

# (anchor, title) in report order.
SECTIONS: tuple[tuple[str, str], ...] = (
    ("notes", "Run notes"),
    ("prober", "Refusal prober (Figure 3)"),
    ("traces", "Refusal-score traces (Figure 4)"),
    ("cliff", "Cliff metrics per group"),
    ("examples", "Examples with the largest misalignment score"),
    ("layerwise", "Layer-wise traces (Figure 5, left)"),
    ("plateau", "Plateau vs harmless prompts (Figure 5, second column)"),
    ("clipping", "Thinking clipping (Figure 5, third and fourth columns)"),
    ("heads", "Attention-head contributions (Figure 6)"),
    ("ablation", "Ablating refusal-suppression heads (Figure 8)"),
    ("evaluation", "Safety fine-tuning evaluation (Table 2, Figure 7)"),
)


# -- small text helpers ------------------------------------------------------------------


class _Html(str):
    """A fragment of trusted HTML, built in this module from escaped parts."""


def _e(value: Any) -> _Html:
    """Escape untrusted text for HTML (trusted `_Html` passes through unchanged)."""
    if isinstance(value, _Html):
        return value
    return _Html(html.escape(str(value), quote=True))


def truncate_text(text: str, limit: int, keep_tail: bool = False) -> str:
    """Shorten `text` to about `limit` characters, marking the cut with "…".

    With `keep_tail` the start and the end are kept and the middle is cut (the end of a
    model's thinking is where the cliff happens, so it is worth showing).
    """
    text = str(text)
    if len(text) <= limit:
        return text
    if keep_tail:
        head = limit // 2
        tail = limit - head
        return text[:head].rstrip() + " … " + text[-tail:].lstrip()
    return text[:limit].rstrip() + " …"


def _fmt(value: Any, digits: int = 3) -> str:
    """A number for display ("—" for missing or non-finite)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def _plain(label: Any) -> str:
    """Text for a matplotlib label: `$` would start mathtext (and can fail to parse)."""
    return str(label).replace("$", r"\$")


def _finite_or_none(value: Any) -> Any:
    """JSON-safe copy: numpy scalars become Python numbers, NaN/inf become None."""
    if isinstance(value, Mapping):
        return {str(k): _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, np.ndarray):
        return _finite_or_none(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def is_harmless_group(group: str) -> bool:
    """Whether a group name denotes harmless prompts ('harmless', 'benign', 'normal')."""
    name = str(group).lower()
    return any(word in name for word in HARMLESS_GROUP_WORDS)


# -- lenient, validating readers ---------------------------------------------------------


def _num(value: Any, where: str, optional: bool = False) -> float | None:
    """A JSON number as float; None passes when `optional`. Anything else is a UserError."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where} must be a number, got {value!r:.60}; regenerate the artifact")
    return float(value)


def _numbers(value: Any, where: str) -> list[float]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where} must be a non-empty list of numbers; regenerate the artifact")
    return [math.nan if v is None else _num(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _expect(obj: Any, kind: type, where: str) -> Any:
    if not isinstance(obj, kind):
        expected = {dict: "an object", list: "a list"}.get(kind, kind.__name__)
        raise UserError(f"{where} must be {expected}, got {type(obj).__name__}; regenerate the artifact")
    return obj


def load_notes(path: Path) -> dict:
    """demo.json → its free-form key/values."""
    return _expect(read_json(path), dict, str(path))


def load_prober(path: Path) -> dict:
    """prober.json → {model_id, layer, metrics: {...}, history: [{epoch, train_loss, ...}]}."""
    data = _expect(read_json(path), dict, str(path))
    metrics = _expect(data.get("metrics") or {}, dict, f"{path}: 'metrics'")
    history = []
    for index, entry in enumerate(_expect(data.get("history") or [], list, f"{path}: 'history'")):
        where = f"{path}: history[{index}]"
        _expect(entry, dict, where)
        history.append({
            "epoch": int(_num(entry.get("epoch", index + 1), f"{where}.epoch")),
            **{key: _num(entry.get(key), f"{where}.{key}", optional=True)
               for key in ("train_loss", "val_loss", "val_accuracy", "ood_accuracy")},
        })
    clean_metrics = {}
    for key, value in metrics.items():
        _num(value, f"{path}: metrics.{key}", optional=True)
        clean_metrics[str(key)] = value  # ints (epochs, counts) stay ints for display
    return {
        "model_id": data.get("model_id"),
        "model_revision": data.get("model_revision"),
        "architecture": data.get("architecture"),
        "layer": data.get("layer"),
        "n_layers": data.get("n_layers"),
        "d_model": data.get("d_model"),
        "final_norm_applied": data.get("final_norm_applied"),
        "end_template": data.get("end_template"),
        "metrics": clean_metrics,
        "history": history,
    }


def load_curves(path: Path) -> dict[str, dict]:
    """curves.json → {group: {x, mean, std (or None), n, end_template_start}}."""
    data = _expect(read_json(path), dict, str(path))
    curves = {}
    for group, entry in data.items():
        where = f"{path}: group {group!r}"
        _expect(entry, dict, where)
        mean = _numbers(entry.get("mean"), f"{where} 'mean'")
        x = _numbers(entry["x"], f"{where} 'x'") if entry.get("x") is not None else \
            np.linspace(0, 100, len(mean)).tolist()
        std = _numbers(entry["std"], f"{where} 'std'") if entry.get("std") is not None else None
        if len(x) != len(mean) or (std is not None and len(std) != len(mean)):
            raise UserError(f"{where}: 'x', 'mean' and 'std' must have the same length; regenerate it")
        n = entry.get("n")
        curves[str(group)] = {
            "x": x, "mean": mean, "std": std,
            "n": int(_num(n, f"{where} 'n'")) if n is not None else None,
            "end_template_start": _num(entry.get("end_template_start"), f"{where} 'end_template_start'",
                                       optional=True),
        }
    return curves


def load_cliff(path: Path) -> list[dict]:
    """cliff.jsonl → [{id, group, plateau, final, ms, t_cliff, drop}].

    A metric may be null (the trace stage writes null for one that does not exist for a trace,
    e.g. a plateau without thinking tokens); `ms` is plateau − final when absent and both exist.
    """
    rows = []
    for index, record in enumerate(read_jsonl(path)):
        where = f"{path} line {index + 1}"
        _expect(record, dict, where)
        if "id" not in record:
            raise UserError(f"{where}: missing 'id'; regenerate it with `refusal-cliff trace`")
        plateau = _num(record.get("plateau"), f"{where}: 'plateau'", optional=True)
        final = _num(record.get("final"), f"{where}: 'final'", optional=True)
        ms = _num(record.get("ms"), f"{where}: 'ms'", optional=True)
        if ms is None and plateau is not None and final is not None:
            ms = plateau - final
        rows.append({
            "id": str(record["id"]),
            "group": str(record.get("group") or "all"),
            "plateau": plateau,
            "final": final,
            "ms": ms,
            "t_cliff": record.get("t_cliff") if isinstance(record.get("t_cliff"), int) else None,
            "drop": _num(record.get("drop"), f"{where}: 'drop'", optional=True),
        })
    return rows


def _layer_sort_key(name: str) -> tuple[int, str]:
    digits = re.findall(r"-?\d+", name)
    return (int(digits[-1]) if digits else 1 << 30, name)


def load_layerwise(path: Path) -> dict:
    """layerwise.json → {"layers": {layer: {"groups": {group: mean trace}, "group_ms_mean": {group: float},
    "ms_mean": float|None}}, "end_template_start": float|None}. Layers are ordered by their number."""
    data = _expect(read_json(path), dict, str(path))
    end_start = None
    layers: dict[str, dict] = {}
    for layer, entry in data.items():
        if layer == "end_template_start":
            end_start = _num(entry, f"{path}: 'end_template_start'", optional=True)
            continue
        where = f"{path}: layer {layer!r}"
        _expect(entry, dict, where)
        groups: dict[str, list[float]] = {}
        group_ms: dict[str, float | None] = {}
        ms_mean = None
        for key, value in entry.items():
            if key == "ms_mean":
                ms_mean = _num(value, f"{where} 'ms_mean'", optional=True)
            elif key == "end_template_start":
                end_start = _num(value, f"{where} 'end_template_start'", optional=True)
            elif isinstance(value, dict) and "mean" in value:
                groups[str(key)] = _numbers(value["mean"], f"{where} group {key!r} 'mean'")
                group_ms[str(key)] = _num(value.get("ms_mean"), f"{where} group {key!r} 'ms_mean'",
                                          optional=True)
            elif isinstance(value, list):  # lenient: {layer: {group: [...]}}
                groups[str(key)] = _numbers(value, f"{where} group {key!r}")
        layers[str(layer)] = {"groups": groups, "group_ms_mean": group_ms, "ms_mean": ms_mean}
    ordered = {name: layers[name] for name in sorted(layers, key=_layer_sort_key)}
    return {"layers": ordered, "end_template_start": end_start}


def _load_rows(path: Path, fields: Mapping[str, bool], sort_key: str) -> list[dict]:
    """A JSON list of flat records; `fields` maps each numeric field to whether it is required."""
    data = _expect(read_json(path), list, str(path))
    rows = []
    for index, entry in enumerate(data):
        where = f"{path}: [{index}]"
        _expect(entry, dict, where)
        row = dict(entry)
        for key, required in fields.items():
            row[key] = _num(entry.get(key), f"{where}.{key}", optional=not required)
        rows.append(row)
    return sorted(rows, key=lambda r: r[sort_key])


def load_clipping(path: Path) -> list[dict]:
    """clipping.json → rows sorted by `fraction`."""
    return _load_rows(path, {"fraction": True, "final_mean": False, "ms_mean": False, "drop_mean": False,
                             "refusal_rate": False, "n": False}, "fraction")


def load_heads(path: Path) -> list[dict]:
    """heads.json → rows with int `layer`/`head` and a `value` (contribution, else contribution_exact)."""
    rows = _load_rows(path, {"layer": True, "head": True, "contribution": False, "contribution_exact": False,
                             "std": False, "rank": False}, "layer")
    for index, row in enumerate(rows):
        row["layer"], row["head"] = int(row["layer"]), int(row["head"])
        row["rank"] = None if row["rank"] is None else int(row["rank"])
        row["value"] = row["contribution"] if row["contribution"] is not None else row["contribution_exact"]
        if row["value"] is None:
            raise UserError(f"{path}: [{index}] has neither 'contribution' nor 'contribution_exact'")
    return sorted(rows, key=lambda r: r["value"])


def load_ablation(path: Path) -> list[dict]:
    """ablation.json → rows sorted by `threshold` (fraction of all heads)."""
    fields = {"threshold": True, "gamma": False, "final_score_mean": False, "asr": False,
              "benign_refusal_rate": False, "n_harmful": False, "n_benign": False}
    rows = _load_rows(path, fields, "threshold")
    for row in rows:
        heads = row.get("heads")
        row["n_heads"] = len(heads) if isinstance(heads, list) else None
        row["renormalize"] = bool(row.get("renormalize", False))
        for key in ("n_harmful", "n_benign"):
            row[key] = None if row[key] is None else int(row[key])
    return rows


_K_KEYS = ("k", "n_examples", "examples", "n")


def _asr_points(entries: Any, where: str) -> list[tuple[float, float]]:
    """[(k, asr)] from [{k, asr}], [[k, asr]] or {"k": [...], "asr": [...]}."""
    if isinstance(entries, dict):
        ks = _numbers(entries.get("k") or entries.get("n_examples"), f"{where} 'k'")
        asrs = _numbers(entries.get("asr"), f"{where} 'asr'")
        if len(ks) != len(asrs):
            raise UserError(f"{where}: 'k' and 'asr' must have the same length")
        return sorted(zip(ks, asrs))
    points = []
    for index, entry in enumerate(_expect(entries, list, where)):
        if isinstance(entry, dict):
            k_key = next((key for key in _K_KEYS if key in entry), "k")
            points.append((_num(entry.get(k_key), f"{where}[{index}].k"),
                           _num(entry.get("asr"), f"{where}[{index}].asr")))
        elif isinstance(entry, list) and len(entry) == 2:
            points.append((_num(entry[0], f"{where}[{index}][0]"), _num(entry[1], f"{where}[{index}][1]")))
        else:
            raise UserError(f"{where}[{index}] must be {{k, asr}} or [k, asr]; regenerate the artifact")
    return sorted(points)


def load_evaluation(path: Path) -> dict:
    """evaluation.json → {"models": [...], "asr_vs_k": {method: [(k, asr), ...]}}.

    `asr_vs_k` may be {method: [{k, asr}...]}, {method: {"k": [...], "asr": [...]}}, or a list of
    {method, k, asr}; when absent it is derived from models that carry `method` and `k`.
    """
    data = _expect(read_json(path), dict, str(path))
    models = []
    for index, entry in enumerate(_expect(data.get("models") or [], list, f"{path}: 'models'")):
        where = f"{path}: models[{index}]"
        _expect(entry, dict, where)
        tasks = {}
        for task, value in _expect(entry.get("tasks") or {}, dict, f"{where}.tasks").items():
            if isinstance(value, dict):  # lenient: {"acc": 0.5, "stderr": ...}
                key = next((k for k in ("acc", "accuracy", "acc_norm", "exact_match") if k in value),
                           next(iter(value), None))
                value = value.get(key) if key is not None else None
            tasks[str(task)] = _num(value, f"{where}.tasks.{task}", optional=True)
        k_key = next((key for key in _K_KEYS if key in entry), None)
        models.append({
            "model": str(entry.get("model", f"model {index}")),
            "method": None if entry.get("method") is None else str(entry["method"]),
            "k": _num(entry.get(k_key), f"{where}.{k_key}", optional=True) if k_key else None,
            **{key: _num(entry.get(key), f"{where}.{key}", optional=True)
               for key in ("asr", "over_refusal", "final_score_mean")},
            "tasks": tasks,
        })
    raw = data.get("asr_vs_k")
    asr_vs_k: dict[str, list[tuple[float, float]]] = {}
    if isinstance(raw, dict):
        for method, entries in raw.items():
            asr_vs_k[str(method)] = _asr_points(entries, f"{path}: asr_vs_k[{method!r}]")
    elif isinstance(raw, list):
        for index, entry in enumerate(raw):
            where = f"{path}: asr_vs_k[{index}]"
            _expect(entry, dict, where)
            k_key = next((key for key in _K_KEYS if key in entry), "k")
            asr_vs_k.setdefault(str(entry.get("method", "?")), []).append(
                (_num(entry.get(k_key), f"{where}.k"), _num(entry.get("asr"), f"{where}.asr")))
        asr_vs_k = {method: sorted(points) for method, points in asr_vs_k.items()}
    elif raw is not None:
        raise UserError(f"{path}: 'asr_vs_k' must be an object or a list; regenerate the artifact")
    else:
        for model in models:
            if model["method"] and model["k"] is not None and model["asr"] is not None:
                asr_vs_k.setdefault(model["method"], []).append((model["k"], model["asr"]))
        asr_vs_k = {method: sorted(points) for method, points in asr_vs_k.items()}
    return {"models": models, "asr_vs_k": asr_vs_k}


# -- plots -------------------------------------------------------------------------------


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list]:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    return figure, axes


def _shade_end_template(ax, start: float | None, end: float = 100.0) -> None:
    if start is not None and math.isfinite(start):
        ax.axvspan(start, end, color=END_TEMPLATE_COLOR, alpha=0.2, lw=0, label="end template")


def plot_prober_history(history: Sequence[Mapping[str, Any]]) -> Figure:
    """Figure 3: training/validation loss and validation/OOD accuracy per epoch.

    Args:
        history: per epoch {epoch, train_loss, val_loss, val_accuracy, ood_accuracy}; missing
            or None values are left out.
    """
    figure, (loss_ax, acc_ax) = _figure(9, 3.4, ncols=2)
    epochs = [entry.get("epoch", i + 1) for i, entry in enumerate(history)]

    def series(ax, key: str, label: str, marker: str) -> None:
        points = [(e, entry.get(key)) for e, entry in zip(epochs, history) if entry.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker=marker, label=label)

    series(loss_ax, "train_loss", "train loss", "o")
    series(loss_ax, "val_loss", "validation loss", "s")
    series(acc_ax, "val_accuracy", "validation accuracy", "o")
    series(acc_ax, "ood_accuracy", "OOD accuracy", "s")
    loss_ax.set(xlabel="epoch", ylabel="BCE loss", title="Loss")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(-0.02, 1.02))
    for ax in (loss_ax, acc_ax):
        if ax.lines:
            ax.legend(frameon=False)
    return figure


def plot_traces(curves: Mapping[str, Mapping[str, Any]], title: str | None = None) -> Figure:
    """Figure 4: averaged normalised refusal-score traces per group, end template shaded orange.

    Args:
        curves: {group: {"x": [0..100], "mean": [...], "std": [...] (optional), "n": int (optional),
            "end_template_start": float (optional)}}; the shaded region starts at the earliest
            `end_template_start`.
    """
    figure, (ax,) = _figure(7.5, 3.8)
    starts = [c.get("end_template_start") for c in curves.values() if c.get("end_template_start") is not None]
    _shade_end_template(ax, min(starts) if starts else None)
    for group, curve in curves.items():
        x, mean = np.asarray(curve["x"], float), np.asarray(curve["mean"], float)  # [points]
        label = f"{group} (n={curve['n']})" if curve.get("n") is not None else str(group)
        (line,) = ax.plot(x, mean, lw=2, label=_plain(label))
        if curve.get("std") is not None:
            std = np.asarray(curve["std"], float)  # [points]
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15, lw=0)
    ax.set(xlabel="normalised position (0 = first prompt token, 100 = last end-template token)",
           ylabel="refusal score", xlim=(0, 100), ylim=(-0.02, 1.02))
    if title:
        ax.set_title(_plain(title))
    ax.legend(frameon=False, loc="best")
    return figure


def plot_layerwise(layers: Mapping[str, Sequence[float]], ms_mean: Mapping[str, float | None] | None = None,
                   end_template_start: float | None = None, group: str | None = None) -> Figure:
    """Figure 5 (left): one averaged trace per layer, coloured by depth; MS per layer on the right.

    Args:
        layers: {layer name: mean normalised trace}, in depth order.
        ms_mean: {layer name: mean misalignment score} (optional second panel).
        end_template_start: where to start the orange end-template shading (0–100).
        group: the prompt group the traces average over (for the title).
    """
    has_ms = bool(ms_mean) and any(v is not None for v in ms_mean.values())
    figure, axes = _figure(10 if has_ms else 7.5, 3.8, ncols=2 if has_ms else 1)
    ax = axes[0]
    _shade_end_template(ax, end_template_start)
    cmap = matplotlib.colormaps["viridis"]
    norm = Normalize(0, max(len(layers) - 1, 1))
    for index, (layer, mean) in enumerate(layers.items()):
        mean = np.asarray(mean, float)  # [points]
        x = np.linspace(0, 100, len(mean))
        ax.plot(x, mean, color=cmap(norm(index)), lw=1.6, label=_plain(f"layer {layer}"))
    ax.set(xlabel="normalised position", ylabel="refusal score", xlim=(0, 100), ylim=(-0.02, 1.02),
           title=_plain(f"Per-layer traces ({group})" if group else "Per-layer traces"))
    if 0 < len(layers) <= 8:
        ax.legend(frameon=False, fontsize="small")
    elif layers:
        bar = figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax)
        names = list(layers)
        ticks = np.linspace(0, len(names) - 1, min(6, len(names))).round().astype(int)
        bar.set_ticks(ticks.tolist(), labels=[_plain(names[t]) for t in ticks])
        bar.set_label("layer")
    if has_ms:
        names = [name for name, value in ms_mean.items() if value is not None]
        axes[1].plot(range(len(names)), [ms_mean[name] for name in names], marker="o")
        axes[1].set_xticks(range(len(names)), [_plain(name) for name in names],
                           rotation=90 if len(names) > 12 else 0, fontsize="small")
        axes[1].axhline(0, color="gray", lw=0.8)
        axes[1].set(xlabel="layer", ylabel="mean MS (plateau − final)", title="Cliff depth per layer")
    return figure


def plot_plateau_vs_harmless(plateaus: Mapping[str, float], finals: Mapping[str, float] | None = None,
                             harmless_score: float | None = None) -> Figure:
    """Figure 5 (second column): mean plateau of harmful groups vs the mean harmless score.

    Args:
        plateaus: {harmful group: mean plateau}.
        finals: {harmful group: mean final score} (drawn next to the plateau).
        harmless_score: mean refusal score over harmless prompts (gray line).
    """
    figure, (ax,) = _figure(6, 3.6)
    groups = list(plateaus)
    x = np.arange(len(groups))
    width = 0.3 if finals else 0.45
    ax.bar(x - (width / 2 if finals else 0), [plateaus[g] for g in groups], width, label="plateau I",
           color="tab:red")
    if finals:
        heights = [np.nan if finals.get(g) is None else finals[g] for g in groups]
        ax.bar(x + width / 2, heights, width, label="final I'",
               color="tab:blue")
    if harmless_score is not None:
        ax.axhline(harmless_score, color="gray", lw=2, ls="--", label="harmless prompts (mean score)")
    ax.set_xticks(x, [_plain(g) for g in groups])
    ax.set_xlim(-1, len(groups))
    ax.set(ylabel="refusal score", ylim=(0, 1.05), title="Plateau vs harmless prompts")
    ax.legend(frameon=False, fontsize="small")
    return figure


def plot_clipping(rows: Sequence[Mapping[str, Any]]) -> Figure:
    """Figure 5 (third and fourth columns): cliff and refusal rate vs thinking-clipping fraction.

    Args:
        rows: [{fraction, final_mean, ms_mean, drop_mean, refusal_rate}], any of the last four optional;
            `fraction` is the fraction of the thinking's tokens kept before the end template.
    """
    figure, (score_ax, rate_ax) = _figure(9, 3.4, ncols=2)
    rows = sorted(rows, key=lambda r: r["fraction"])

    def series(ax, key: str, label: str, marker: str) -> None:
        points = [(r["fraction"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker=marker, label=label)

    series(score_ax, "final_mean", "final score I'", "o")
    series(score_ax, "ms_mean", "cliff MS = I − I'", "s")
    series(score_ax, "drop_mean", "largest one-step drop", "^")
    series(rate_ax, "refusal_rate", "refusal rate", "o")
    score_ax.set(xlabel="fraction of thinking kept", ylabel="score", title="Cliff vs clipping")
    rate_ax.set(xlabel="fraction of thinking kept", ylabel="refusal rate", ylim=(-0.02, 1.02),
                title="Refusals vs clipping")
    for ax in (score_ax, rate_ax):
        if ax.lines:
            ax.legend(frameon=False, fontsize="small")
    return figure


def heads_matrix(heads: Sequence[Mapping[str, Any]], value: str = "value",
                 n_layers: int | None = None, n_heads: int | None = None) -> np.ndarray:
    """[n_layers, n_heads] array of a per-head value from heads.json rows (NaN where absent)."""
    n_layers = n_layers or (max(int(h["layer"]) for h in heads) + 1 if heads else 0)
    n_heads = n_heads or (max(int(h["head"]) for h in heads) + 1 if heads else 0)
    matrix = np.full((n_layers, n_heads), np.nan)  # [n_layers, n_heads]
    for head in heads:
        if head.get(value) is not None:
            matrix[int(head["layer"]), int(head["head"])] = head[value]
    return matrix


def plot_heads(matrix: Any, title: str | None = None) -> Figure:
    """Figure 6: heatmap of per-head contributions, layers × heads, red positive / blue negative.

    Args:
        matrix: array-like [n_layers, n_heads]; NaN cells are left blank. The diverging colormap
            is centred at 0 and symmetric.
    """
    matrix = np.asarray(matrix, float)  # [n_layers, n_heads]
    if matrix.ndim != 2:
        raise ValueError(f"plot_heads needs a 2-D [layers, heads] array, got shape {matrix.shape}")
    n_layers, n_heads = matrix.shape
    figure, (ax,) = _figure(min(3 + 0.35 * n_heads, 12), min(2.5 + 0.22 * n_layers, 11))
    ax.grid(False)
    limit = float(np.nanmax(np.abs(matrix))) if np.isfinite(matrix).any() else 1.0
    limit = max(limit, 1e-12)
    image = ax.imshow(matrix, cmap="RdBu_r", norm=TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit),
                      aspect="auto", origin="lower", interpolation="nearest")
    ax.set(xlabel="head", ylabel="layer", title=_plain(title or "Head contributions to the refusal score"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    figure.colorbar(image, ax=ax, label="contribution (red: towards refusal)")
    return figure


def plot_ablation(rows: Sequence[Mapping[str, Any]]) -> Figure:
    """Figure 8: final refusal score, ASR and benign refusal rate vs the ablation threshold.

    Args:
        rows: [{threshold (fraction of all heads), final_score_mean, asr, benign_refusal_rate,
            gamma, renormalize}]; one line per (gamma, renormalize) setting.
    """
    figure, axes = _figure(11, 3.4, ncols=3)
    settings: dict[tuple, list] = {}
    for row in rows:
        settings.setdefault((row.get("gamma"), bool(row.get("renormalize"))), []).append(row)
    panels = (("final_score_mean", "Final refusal score (higher: safer)"),
              ("asr", "ASR (lower: safer)"), ("benign_refusal_rate", "Benign refusal rate"))
    for ax, (key, title) in zip(axes, panels):
        for (gamma, renormalize), group in settings.items():
            points = sorted((100 * r["threshold"], r[key]) for r in group if r.get(key) is not None)
            if not points:
                continue
            label = "γ=" + ("?" if gamma is None else f"{gamma:g}")
            label += ", renormalised" if renormalize else ""
            ax.plot(*zip(*points), marker="o", label=label)
        ax.set(xlabel="ablated heads (% of all heads)", title=title, ylim=(-0.02, 1.02))
        if ax.lines and len(settings) > 1:
            ax.legend(frameon=False, fontsize="small")
    return figure


def plot_asr_vs_k(asr_vs_k: Mapping[str, Sequence[tuple[float, float]]]) -> Figure:
    """Figure 7: ASR vs number of training examples, one line per selection method.

    Args:
        asr_vs_k: {method: [(k, asr), ...]}.
    """
    figure, (ax,) = _figure(6.5, 3.8)
    all_k = [k for points in asr_vs_k.values() for k, _ in points if k > 0]
    for method, points in asr_vs_k.items():
        points = sorted(points)
        if points:
            ax.plot(*zip(*points), marker="o", label=_plain(method))
    if all_k and max(all_k) / min(all_k) >= 20:
        ax.set_xscale("log")
    ax.set(xlabel="training examples", ylabel="ASR", ylim=(-0.02, 1.02), title="ASR vs training examples")
    if ax.lines:
        ax.legend(frameon=False, fontsize="small")
    return figure


def figure_png(figure: Figure) -> bytes:
    """The PNG bytes of a figure."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI)
    return buffer.getvalue()


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write a figure as PNG (for stages that want their own plots)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(figure_png(figure))
    return path


# -- locating artifacts ------------------------------------------------------------------


def find_artifacts(run_dir: Path, name: str) -> list[Path]:
    """`name` in `run_dir` first, then in its immediate sub-folders (sorted by name)."""
    found = [run_dir / name] if (run_dir / name).is_file() else []
    subfolders = sorted(p for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    return found + [sub / name for sub in subfolders if (sub / name).is_file()]


LOADERS = {
    "demo.json": load_notes,
    "prober.json": load_prober,
    "curves.json": load_curves,
    "cliff.jsonl": load_cliff,
    "layerwise.json": load_layerwise,
    "clipping.json": load_clipping,
    "heads.json": load_heads,
    "ablation.json": load_ablation,
    "evaluation.json": load_evaluation,
}


@dataclass
class RunArtifacts:
    """Everything a run folder holds for the report, parsed and validated."""

    run_dir: Path
    data: dict[str, Any] = field(default_factory=dict)  # artifact name → parsed content
    paths: dict[str, Path] = field(default_factory=dict)  # artifact name → the file it was read from
    # generations.jsonl path → {id: record}, and → {id: label} from the labels.jsonl beside it
    generations: dict[Path, dict[str, dict]] = field(default_factory=dict)
    labels: dict[Path, dict[str, dict]] = field(default_factory=dict)

    def get(self, name: str) -> tuple[Path | None, Any]:
        return self.paths.get(name), self.data.get(name)


def _by_id(path: Path) -> dict[str, dict]:
    records = {}
    for index, record in enumerate(read_jsonl(path)):
        _expect(record, dict, f"{path} line {index + 1}")
        records.setdefault(str(record.get("id")), record)
    return records


def load_run(run_dir: str | Path) -> RunArtifacts:
    """Find and parse every artifact the report uses, before anything is drawn or written.

    Each artifact is looked up in `run_dir` and then its immediate sub-folders; the first one
    found is used. Every generations.jsonl is read (with the labels.jsonl beside it), since
    examples are joined to their texts by id. Raises UserError for a malformed artifact.
    """
    run_dir = Path(run_dir)
    artifacts = RunArtifacts(run_dir)
    for name, loader in LOADERS.items():
        paths = find_artifacts(run_dir, name)
        if len(paths) > 1:
            logger.warning("several %s found; using %s", name, paths[0])
        if paths:
            artifacts.paths[name] = paths[0]
            artifacts.data[name] = loader(paths[0])
    for path in find_artifacts(run_dir, "generations.jsonl"):
        artifacts.generations[path] = _by_id(path)
        label_path = path.parent / "labels.jsonl"
        artifacts.labels[path] = _by_id(label_path) if label_path.is_file() else {}
    return artifacts


@dataclass
class _Report:
    """Accumulates the sections, the skipped sections and the summary while rendering."""

    artifacts: RunArtifacts
    sections: dict[str, _Html] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)  # PNG file name → section
    sources: dict[str, list[str]] = field(default_factory=dict)  # artifact name → files shown

    @property
    def run_dir(self) -> Path:
        return self.artifacts.run_dir

    def get(self, name: str) -> tuple[Path | None, Any]:
        path, data = self.artifacts.get(name)
        if path is not None:
            self.sources[name] = [self.rel(path)]
        return path, data

    def rel(self, path: Path) -> str:
        return path.relative_to(self.run_dir).as_posix()

    def figure(self, section: str, name: str, figure: Figure, alt: str, caption: str) -> _Html:
        """Save a figure as `name` in the run folder and return its embedded <figure>."""
        png = figure_png(figure)
        (self.run_dir / name).write_bytes(png)
        self.figures[name] = section
        data = base64.b64encode(png).decode("ascii")
        return _Html(f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}">'
                     f'<figcaption>{_e(caption)} <span class="muted">({_e(name)})</span></figcaption>'
                     "</figure>")

    def source_note(self, *paths: Path | None) -> _Html:
        names = ", ".join(self.rel(p) for p in paths if p is not None)
        return _Html(f'<p class="muted">Source: {_e(names)}</p>')


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], css: str = "") -> _Html:
    """An HTML table; every cell that is not `_Html` is formatted and escaped."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(f"<td>{cell if isinstance(cell, _Html) else _e(_fmt(cell))}</td>" for cell in row)
        body.append(f"<tr>{cells}</tr>")
    cls = f' class="{_e(css)}"' if css else ""
    return _Html(f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def _text_block(text: Any, limit: int, keep_tail: bool = False) -> _Html:
    if text is None or text == "":
        return _Html('<span class="muted">(empty)</span>')
    return _Html(f'<div class="text">{_e(truncate_text(str(text), limit, keep_tail))}</div>')


# -- sections ----------------------------------------------------------------------------


def _section_notes(report: _Report) -> None:
    path, notes = report.get("demo.json")
    if path is None:
        report.skipped["notes"] = "no demo.json"
        return
    rows = []
    for key, value in notes.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        rows.append([str(key), _text_block(text, NOTE_CHARS)])
    report.summary["notes"] = _finite_or_none(notes)
    report.sections["notes"] = _Html(_table(["key", "value"], rows, "notes") + report.source_note(path))


def _section_prober(report: _Report) -> dict | None:
    path, prober = report.get("prober.json")
    if path is None:
        report.skipped["prober"] = "no prober.json (run `refusal-cliff probe train`)"
        return None
    metrics = prober["metrics"]
    facts = [["model", prober["model_id"] or "—"], ["layer", prober["layer"]],
             ["final norm applied", prober["final_norm_applied"]], ["d_model", prober["d_model"]]]
    facts += [[key.replace("_", " "), value] for key, value in metrics.items()]
    parts = [_table(["", "value"], facts, "facts")]
    if prober["history"]:
        parts.append(report.figure("prober", "fig_prober.png", plot_prober_history(prober["history"]),
                                   "prober loss and accuracy per epoch",
                                   "Loss, validation accuracy and OOD accuracy of the refusal prober "
                                   "per epoch."))
        keys = ("epoch", "train_loss", "val_loss", "val_accuracy", "ood_accuracy")
        parts.append(_table(["epoch", "train loss", "val loss", "val accuracy", "OOD accuracy"],
                            [[h[k] for k in keys] for h in prober["history"]]))
    parts.append(report.source_note(path))
    report.summary["prober"] = {key: prober[key] for key in
                                ("model_id", "model_revision", "layer", "d_model", "final_norm_applied",
                                 "metrics", "history")}
    report.sections["prober"] = _Html("".join(parts))
    return prober


def _curve_stats(curve: Mapping[str, Any]) -> dict:
    mean = np.asarray(curve["mean"], float)  # [points]
    return {"n": curve.get("n"), "max": float(np.nanmax(mean)), "last": float(mean[-1]),
            "max_minus_last": float(np.nanmax(mean) - mean[-1]), "mean": float(np.nanmean(mean)),
            "end_template_start": curve.get("end_template_start")}


def _section_traces(report: _Report) -> dict | None:
    path, curves = report.get("curves.json")
    if path is None:
        report.skipped["traces"] = "no curves.json (run `refusal-cliff trace`)"
        return None
    if not curves:
        report.skipped["traces"] = f"{report.rel(path)} holds no groups"
        return None
    stats = {group: _curve_stats(curve) for group, curve in curves.items()}
    figure = report.figure("traces", "fig_traces.png", plot_traces(curves), "averaged refusal-score traces",
                           "Averaged refusal score over normalised positions (band: ±1 std); "
                           "the end-template region is shaded orange.")
    rows = [[group, s["n"], s["max"], s["last"], s["max_minus_last"], s["end_template_start"]]
            for group, s in stats.items()]
    table = _table(["group", "n", "max of mean trace", "mean trace at 100", "max − last",
                    "end template starts at"], rows)
    report.summary["traces"] = stats
    report.sections["traces"] = _Html(figure + table + report.source_note(path))
    return curves


def _group_stats(rows: Sequence[dict]) -> dict[str, dict]:
    stats: dict[str, dict] = {}
    for group in dict.fromkeys(r["group"] for r in rows):
        members = [r for r in rows if r["group"] == group]
        ms = [r["ms"] for r in members if r["ms"] is not None]
        stats[group] = {"n": len(members), "n_with_ms": len(ms),
                        "plateau_mean": _mean([r["plateau"] for r in members]),
                        "final_mean": _mean([r["final"] for r in members]), "ms_mean": _mean(ms),
                        "ms_max": max(ms) if ms else None,
                        "drop_mean": _mean([r["drop"] for r in members])}
    return stats


def _section_cliff(report: _Report) -> tuple[Path | None, list[dict] | None]:
    path, rows = report.get("cliff.jsonl")
    if path is None:
        report.skipped["cliff"] = "no cliff.jsonl (run `refusal-cliff trace`)"
        return None, None
    if not rows:
        report.skipped["cliff"] = f"{report.rel(path)} is empty"
        return path, None
    stats = _group_stats(rows)
    keys = ("n", "plateau_mean", "final_mean", "ms_mean", "ms_max", "drop_mean")
    headers = ["group", "n", "mean plateau I", "mean final I'", "mean MS", "max MS", "mean largest drop"]
    table = _table(headers, [[g, *(s[k] for k in keys)] for g, s in stats.items()])
    report.summary["cliff"] = stats
    report.sections["cliff"] = _Html(table + report.source_note(path))
    return path, rows


def _tokens(name: str) -> set[str]:
    return {token for token in re.split(r"[^a-z0-9]+", name.lower()) if token}


def _generation_lookup(report: _Report, cliff_path: Path, group: str) -> list[Path]:
    """generations.jsonl files to look an example up in, best first.

    Prompt ids are row indices, so harmful and harmless runs share ids; prefer a folder whose
    name shares a word with the group (`generate_harmful/` for `harmful` or `harmful_complied`),
    then the cliff's own folder, then the run folder, then the others (by name).
    """
    group_tokens = _tokens(group)

    def rank(path: Path) -> int:
        folder = path.parent
        if folder != report.run_dir and group_tokens & _tokens(folder.name):
            return 0
        if folder == cliff_path.parent:
            return 1
        return 2 if folder == report.run_dir else 3

    return sorted(report.artifacts.generations, key=rank)


def _section_examples(report: _Report, cliff_path: Path | None, rows: list[dict] | None, top: int) -> None:
    if not rows or cliff_path is None:
        report.skipped["examples"] = "needs cliff.jsonl"
        return
    scored = [r for r in rows if r["ms"] is not None]
    harmful = [r for r in scored if not is_harmless_group(r.get("group") or "")]
    # the cliff is about harmful prompts: show those when there are any
    chosen = sorted(harmful or scored, key=lambda r: r["ms"], reverse=True)[:top]
    if not chosen:
        report.skipped["examples"] = "no example in cliff.jsonl has a misalignment score"
        return
    table_rows, summary_rows, sources = [], [], set()
    for rank, row in enumerate(chosen, start=1):
        generation, labels = None, None
        for path in _generation_lookup(report, cliff_path, row["group"]):
            if row["id"] in report.artifacts.generations[path]:
                generation = report.artifacts.generations[path][row["id"]]
                labels = report.artifacts.labels[path].get(row["id"])
                sources.add(path)
                if labels is not None:
                    sources.add(path.parent / "labels.jsonl")
                break
        generation = generation or {}
        refusal = labels.get("refusal") if labels else None
        refusal = refusal if isinstance(refusal, bool) else None
        table_rows.append([rank, row["id"], row["group"], row["plateau"], row["final"], row["ms"], refusal,
                           _text_block(generation.get("prompt"), PROMPT_CHARS),
                           _text_block(generation.get("thinking"), THINKING_CHARS, keep_tail=True),
                           _text_block(generation.get("answer"), ANSWER_CHARS)])
        summary_rows.append({"rank": rank, "id": row["id"], "group": row["group"], "plateau": row["plateau"],
                             "final": row["final"], "ms": row["ms"], "refusal": refusal,
                             "text_found": bool(generation)})
    if sources:
        report.sources["generations.jsonl"] = sorted(
            report.rel(p) for p in sources if p.name == "generations.jsonl")
    note = "" if sources else '<p class="muted">No generations.jsonl holds these ids: no texts.</p>'
    headers = ["#", "id", "group", "plateau I", "final I'", "MS", "refused", "prompt", "thinking", "answer"]
    table = _table(headers, table_rows, "examples")
    report.summary["examples"] = summary_rows
    report.sections["examples"] = _Html(
        f"<p>The {len(chosen)} examples with the largest MS = I − I' "
        '(long texts are cut, marked "…").</p>'
        + note + table + report.source_note(cliff_path, *sorted(sources)))


def _preferred_group(groups: Sequence[str]) -> str | None:
    """The group whose per-layer traces show the cliff: complied harmful > harmful > first non-harmless."""
    harmful = [g for g in groups if not is_harmless_group(g)]
    for candidate in harmful:
        if "compl" in candidate.lower():
            return candidate
    for candidate in harmful:
        if candidate.lower() == "harmful":
            return candidate
    return harmful[0] if harmful else (groups[0] if groups else None)


def _section_layerwise(report: _Report, curves: dict | None) -> None:
    path, data = report.get("layerwise.json")
    if path is None:
        report.skipped["layerwise"] = "no layerwise.json (run `refusal-cliff layers`)"
        return
    groups = list(dict.fromkeys(g for layer in data["layers"].values() for g in layer["groups"]))
    group = _preferred_group(groups)
    traces = {name: layer["groups"][group] for name, layer in data["layers"].items()
              if group in layer["groups"]}
    # The shown group's own mean MS per layer where the producer wrote it, else the layer's overall one.
    ms_mean = {name: layer["group_ms_mean"].get(group) if layer["group_ms_mean"].get(group) is not None
               else layer["ms_mean"] for name, layer in data["layers"].items()}
    if not traces and not any(v is not None for v in ms_mean.values()):
        report.skipped["layerwise"] = f"{report.rel(path)} holds no layers"
        return
    end_start = data["end_template_start"]
    if end_start is None and curves and group in curves:
        end_start = curves[group].get("end_template_start")
    figure = report.figure("layerwise", "fig_layerwise.png",
                           plot_layerwise(traces, ms_mean, end_start, group),
                           "per-layer refusal-score traces",
                           f"Averaged refusal-score traces of group '{group}' at each probed layer (shallow: "
                           "dark, deep: yellow); right: mean misalignment score per layer.")
    summary = {name: {"ms_mean": ms_mean[name], "ms_mean_all_groups": layer["ms_mean"],
                      **({"max": float(np.nanmax(layer["groups"][group])), "last": layer["groups"][group][-1]}
                         if group in layer["groups"] else {})}
               for name, layer in data["layers"].items()}
    table = _table(["layer", "mean MS", "max of mean trace", "mean trace at 100"],
                   [[name, s["ms_mean"], s.get("max"), s.get("last")] for name, s in summary.items()])
    report.summary["layerwise"] = {"group": group, "layers": summary}
    report.sections["layerwise"] = _Html(figure + table + report.source_note(path))


def _section_plateau(report: _Report, cliff_rows: list[dict] | None, curves: dict | None) -> None:
    if not cliff_rows:
        report.skipped["plateau"] = "needs cliff.jsonl with harmful groups"
        return
    stats = _group_stats(cliff_rows)
    harmful = {g: s for g, s in stats.items() if not is_harmless_group(g) and s["plateau_mean"] is not None}
    if not harmful:
        report.skipped["plateau"] = "cliff.jsonl has no harmful group"
        return
    harmless_groups = [g for g in (curves or {}) if is_harmless_group(g)]
    if not harmless_groups:
        report.skipped["plateau"] = "needs a harmless group in curves.json for the reference score"
        return
    # Mean refusal score over the whole (normalised) trace of harmless prompts, averaged over
    # harmless groups weighted by their sizes.
    weights = [curves[g].get("n") or 1 for g in harmless_groups]
    harmless_means = [np.nanmean(curves[g]["mean"]) for g in harmless_groups]
    harmless_score = float(np.average(harmless_means, weights=weights))
    plateaus = {g: s["plateau_mean"] for g, s in harmful.items()}
    finals = {g: s["final_mean"] for g, s in harmful.items()}
    figure = report.figure("plateau", "fig_plateau.png",
                           plot_plateau_vs_harmless(plateaus, finals, harmless_score),
                           "plateau vs harmless score",
                           "Mean plateau I and final score I' of harmful prompts; the gray line is the mean "
                           "refusal score over harmless prompts' traces.")
    rows = [[g, plateaus[g], finals[g], plateaus[g] - harmless_score] for g in harmful]
    table = _table(["harmful group", "mean plateau I", "mean final I'", "plateau − harmless score"], rows)
    report.summary["plateau"] = {"harmless_groups": harmless_groups, "harmless_score": harmless_score,
                                 "groups": {g: {"plateau_mean": plateaus[g], "final_mean": finals[g],
                                                "plateau_minus_harmless": plateaus[g] - harmless_score}
                                            for g in harmful}}
    report.sections["plateau"] = _Html(
        _Html(f'<p>Mean harmless-prompt refusal score: <b>{_e(_fmt(harmless_score))}</b> '
              f'(groups: {_e(", ".join(harmless_groups))}).</p>') + figure + table)


def _section_clipping(report: _Report) -> None:
    path, rows = report.get("clipping.json")
    if path is None:
        report.skipped["clipping"] = "no clipping.json (run `refusal-cliff clip`)"
        return
    if not rows:
        report.skipped["clipping"] = f"{report.rel(path)} is empty"
        return
    figure = report.figure("clipping", "fig_clipping.png", plot_clipping(rows), "cliff vs thinking clipping",
                           "Final score, cliff (MS) and refusal rate as the thinking is clipped.")
    keys = ("fraction", "final_mean", "ms_mean", "drop_mean", "refusal_rate", "n")
    headers = ["fraction of thinking kept", "mean final I'", "mean MS", "mean largest drop", "refusal rate",
               "n"]
    table = _table(headers, [[r[k] if k != "n" or r[k] is None else int(r[k]) for k in keys] for r in rows])
    report.summary["clipping"] = [{k: r[k] for k in keys} for r in rows]
    report.sections["clipping"] = _Html(figure + table + report.source_note(path))


def _section_heads(report: _Report, prober: dict | None) -> None:
    path, heads = report.get("heads.json")
    if path is None:
        report.skipped["heads"] = "no heads.json (run `refusal-cliff heads`)"
        return
    if not heads:
        report.skipped["heads"] = f"{report.rel(path)} is empty"
        return
    n_layers = None
    prober_layers = prober.get("n_layers") if prober else None
    if isinstance(prober_layers, int) and prober_layers > max(h["layer"] for h in heads):
        n_layers = prober_layers  # show layers without scored heads as blank rows
    matrix = heads_matrix(heads, n_layers=n_layers)  # [n_layers, n_heads]
    figure = report.figure("heads", "fig_heads.png", plot_heads(matrix), "per-head contribution heatmap",
                           "Mean contribution of each attention head to the refusal score at t_cliff "
                           "(red: towards refusal, blue: suppresses refusal).")
    top = heads[:10]
    keys = ("rank", "layer", "head", "contribution", "contribution_exact", "std")
    table = _table(["rank", "layer", "head", "contribution", "exact contribution", "std"],
                   [[h[k] for k in keys] for h in top])
    report.summary["heads"] = {"n_heads_scored": len(heads), "shape": list(matrix.shape),
                               "min": float(np.nanmin(matrix)), "max": float(np.nanmax(matrix)),
                               "top_suppression_heads": [{k: h[k] for k in keys} for h in top]}
    report.sections["heads"] = _Html(figure + "<h3>Strongest refusal-suppression heads</h3>" + table
                                     + report.source_note(path))


def _section_ablation(report: _Report) -> None:
    path, rows = report.get("ablation.json")
    if path is None:
        report.skipped["ablation"] = "no ablation.json (run `refusal-cliff ablate`)"
        return
    if not rows:
        report.skipped["ablation"] = f"{report.rel(path)} is empty"
        return
    figure = report.figure("ablation", "fig_ablation.png", plot_ablation(rows), "ablation results",
                           "Refusal score at the last token, ASR and benign refusal rate as more "
                           "refusal-suppression heads are ablated.")
    keys = ("threshold", "n_heads", "gamma", "renormalize", "final_score_mean", "asr", "benign_refusal_rate",
            "n_harmful", "n_benign")
    headers = ["threshold", "heads", "γ", "renormalised", "mean final score", "ASR", "benign refusal rate",
               "n harmful", "n benign"]
    table = _table(headers, [[_pct(r["threshold"]), r["n_heads"], r["gamma"], r["renormalize"],
                              r["final_score_mean"], _pct(r["asr"]), _pct(r["benign_refusal_rate"]),
                              r["n_harmful"], r["n_benign"]] for r in rows])
    report.summary["ablation"] = [{k: r[k] for k in keys} for r in rows]
    report.sections["ablation"] = _Html(figure + table + report.source_note(path))


def _section_evaluation(report: _Report) -> None:
    path, data = report.get("evaluation.json")
    if path is None:
        report.skipped["evaluation"] = "no evaluation.json (run `refusal-cliff evaluate`)"
        return
    models, asr_vs_k = data["models"], data["asr_vs_k"]
    if not models and not asr_vs_k:
        report.skipped["evaluation"] = f"{report.rel(path)} holds no models"
        return
    tasks = list(dict.fromkeys(t for m in models for t in m["tasks"]))
    show_method = any(m["method"] for m in models)
    show_k = any(m["k"] is not None for m in models)
    headers = (["model"] + (["method"] if show_method else []) + (["examples"] if show_k else [])
               + ["ASR", "over-refusal", "mean final score"] + tasks)
    rows = [[m["model"]] + ([m["method"] or "—"] if show_method else [])
            + ([None if m["k"] is None else int(m["k"])] if show_k else [])
            + [_pct(m["asr"]), _pct(m["over_refusal"]), m["final_score_mean"]]
            + [m["tasks"].get(t) for t in tasks] for m in models]
    parts = [_table(headers, rows)] if models else []
    if asr_vs_k:
        parts.append(report.figure("evaluation", "fig_asr_vs_k.png", plot_asr_vs_k(asr_vs_k),
                                   "ASR vs examples",
                                   "ASR after fine-tuning vs the number of training examples, per "
                                   "selection method."))
    parts.append(report.source_note(path))
    curves = {method: [{"k": k, "asr": asr} for k, asr in points] for method, points in asr_vs_k.items()}
    report.summary["evaluation"] = {"models": models, "asr_vs_k": curves}
    report.sections["evaluation"] = _Html("".join(parts))


# -- page --------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2328;
margin:0;background:#f6f8fa;line-height:1.45}
header{background:#24292f;color:#fff;padding:18px 32px}header h1{margin:0 0 6px;font-size:1.5em}
header .meta{color:#d0d7de;font-size:.9em}header .meta span{margin-right:18px}
main{max-width:1200px;margin:0 auto;padding:16px 32px 48px}
section,nav,.skipped{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px 20px;
margin:16px 0}
h2{font-size:1.2em;border-bottom:1px solid #d8dee4;padding-bottom:6px}h3{font-size:1em}
nav ol{margin:4px 0;columns:2}a{color:#0969da;text-decoration:none}a:hover{text-decoration:underline}
.skipped{background:#fff8c5;border-color:#d4a72c}.skipped ul{margin:4px 0}
table{border-collapse:collapse;margin:8px 0;font-size:.88em}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa}tbody tr:nth-child(even){background:#fafbfc}
table.examples td{max-width:340px}table.notes td{max-width:800px}
.text{white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,Menlo,Consolas,monospace;
font-size:.85em;max-height:22em;overflow:auto}
figure{margin:10px 0}figure img{max-width:100%;height:auto;border:1px solid #eaeef2}
figcaption{font-size:.88em;color:#57606a}.muted{color:#6e7781;font-size:.85em}
"""


def _run_facts(run_dir: Path, prober: dict | None) -> dict[str, Any]:
    """Model id(s), revision and start time from the run's metadata files (best effort)."""
    model_ids: list[str] = []
    revisions: list[str] = []
    started: list[str] = []
    paths = [p for folder in [run_dir, *sorted(d for d in run_dir.iterdir() if d.is_dir())]
             for p in sorted(folder.glob("metadata*.json"))]
    for path in paths:
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            logger.warning("ignoring unreadable %s", path)
            continue
        if not isinstance(meta, dict):
            continue
        for key, bucket in (("model_id", model_ids), ("model_revision", revisions), ("started", started)):
            if isinstance(meta.get(key), str) and meta[key] not in bucket:
                bucket.append(meta[key])
    if prober and isinstance(prober.get("model_id"), str) and prober["model_id"] not in model_ids:
        model_ids.insert(0, prober["model_id"])
    return {"model_ids": model_ids, "model_revisions": revisions,
            "started": min(started) if started else None}


def _page(report: _Report, facts: dict, generated: str) -> str:
    titles = dict(SECTIONS)
    models = ", ".join(facts["model_ids"]) or "unknown"
    meta = [f"<span>model: <b>{_e(models)}</b></span>"]
    if facts["model_revisions"]:
        meta.append(f"<span>revision: {_e(', '.join(facts['model_revisions']))}</span>")
    if facts["started"]:
        meta.append(f"<span>run started: {_e(facts['started'])}</span>")
    meta += [f"<span>report generated: {_e(generated)}</span>",
             f"<span>refusal-cliff {_e(__version__)}</span>",
             f"<span>folder: {_e(report.run_dir.name)}</span>"]
    parts = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{_e('refusal-cliff report — ' + models)}</title><style>{_CSS}</style></head><body>",
             f'<header><h1>Refusal-cliff report</h1><div class="meta">{"".join(meta)}</div></header><main>']
    if report.skipped:
        items = "".join(f"<li><b>{_e(titles[key])}</b>: {_e(reason)}</li>"
                        for key, reason in report.skipped.items())
        parts.append(f'<div class="skipped"><b>Skipped sections</b> (missing artifacts)<ul>{items}</ul>'
                     "</div>")
    present = [key for key, _ in SECTIONS if key in report.sections]
    if present:
        links = "".join(f'<li><a href="#{key}">{_e(titles[key])}</a></li>' for key in present)
        parts.append(f"<nav><b>Contents</b><ol>{links}</ol></nav>")
    else:
        parts.append('<section><p>This run folder holds no artifacts the report can show.</p></section>')
    for key in present:
        parts.append(f'<section id="{key}"><h2>{_e(titles[key])}</h2>{report.sections[key]}</section>')
    parts.append("</main></body></html>\n")
    return "".join(parts)


def render_report(run_dir: str | Path, top_examples: int = 10) -> Path:
    """Render `report.html`, `summary.json` and `fig_*.png` into `run_dir` from its artifacts.

    Artifacts are looked up in `run_dir` and its immediate sub-folders. Missing artifacts only
    skip sections (listed at the top of the report and in summary.json); malformed ones raise
    `UserError`.

    Args:
        run_dir: the run folder.
        top_examples: how many examples with the largest MS to show.

    Returns:
        The path of report.html.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}; pass the --out folder of a previous stage")
    if top_examples < 1:
        raise UserError("the number of examples to show must be at least 1")
    artifacts = load_run(run_dir)  # every malformed artifact fails here, before anything is written
    for name in FIGURE_NAMES:  # figures of sections that may now be skipped
        (run_dir / name).unlink(missing_ok=True)
    report = _Report(artifacts)
    _section_notes(report)
    prober = _section_prober(report)
    curves = _section_traces(report)
    cliff_path, cliff_rows = _section_cliff(report)
    _section_examples(report, cliff_path, cliff_rows, top_examples)
    _section_layerwise(report, curves)
    _section_plateau(report, cliff_rows, curves)
    _section_clipping(report)
    _section_heads(report, prober)
    _section_ablation(report)
    _section_evaluation(report)

    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    facts = _run_facts(run_dir, prober)
    order = [key for key, _ in SECTIONS]
    summary = {
        "refusal_cliff_version": __version__,
        "generated": generated,
        **facts,
        "sections": [key for key in order if key in report.sections],
        "skipped": {key: report.skipped[key] for key in order if key in report.skipped},
        "figures": report.figures,
        "sources": report.sources,
        **{key: report.summary[key] for key in order if key in report.summary},
    }
    write_json(run_dir / SUMMARY_NAME, _finite_or_none(summary))
    path = run_dir / REPORT_NAME
    atomic_write_text(path, _page(report, facts, generated))
    logger.info("report: %s (%d sections, %d skipped)", path, len(report.sections), len(report.skipped))
    return path

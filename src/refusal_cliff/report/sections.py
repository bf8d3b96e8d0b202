"""The report's sections: one registry entry each, in report order.

Why a registry: a section needs some artifacts, may draw one figure and adds numbers to
summary.json. `SECTIONS` holds all of that in one `Section(name, title, artifacts, render,
figure)` entry, so adding a section or a figure is one entry plus its `render` function. A
section whose artifacts are missing is skipped with the command that writes them; `render`
raises `Skip` when the artifacts are there but hold nothing to show.

A render function reads artifacts through the `Context` (which records the files shown),
builds HTML with the helpers of `html.py` (every untrusted string escaped), and returns the
section's body and its summary.json entry.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from refusal_cliff.core.runs import read_json
from refusal_cliff.report import plotting
from refusal_cliff.report.artifacts import ARTIFACTS, RunArtifacts, TraceToken, read_trace_tokens
from refusal_cliff.report.html import (
    Html,
    escape,
    figure_tag,
    fmt,
    heading,
    join,
    paragraph,
    pct,
    table,
    text_block,
)

HARMLESS_GROUP_WORDS = ("harmless", "benign", "normal")

# Truncation limits (characters) for texts shown in tables.
PROMPT_CHARS = 500
THINKING_CHARS = 1200
ANSWER_CHARS = 600
NOTE_CHARS = 2000
SELECTED_SHOWN = 10  # selected candidates listed in the Cliff-as-a-Judge section
TOKEN_VIEW_EXAMPLES = 5  # examples of the token view (the largest MS first)
TOKEN_VIEW_THINKING = 48  # thinking tokens the token view shows before the end template


class Skip(Exception):
    """Raised by a render function: the section's artifacts hold nothing to show (the message says why)."""


@dataclass
class Context:
    """What render functions read from and write figures through; collects sources and figures."""

    artifacts: RunArtifacts
    top_examples: int = 10  # how many examples the examples section lists
    section: Section | None = None  # the section being rendered
    figures: dict[str, str] = field(default_factory=dict)  # PNG file name → section
    sources: dict[str, list[str]] = field(default_factory=dict)  # artifact name → files shown

    @property
    def run_dir(self) -> Path:
        return self.artifacts.run_dir

    def get(self, name: str) -> Any:
        """The parsed artifact `name` (None when absent), recorded as a source of the report."""
        path, data = self.artifacts.get(name)
        if path is not None:
            self.sources[name] = [self.rel(path)]
        return data

    def path(self, name: str) -> Path | None:
        return self.artifacts.paths.get(name)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.run_dir).as_posix()

    def figure(self, figure: Figure, alt: str, caption: str) -> Html:
        """Save the current section's figure in the run folder and return its embedded <figure>."""
        name = self.section.figure
        if name is None:
            raise ValueError(f"section {self.section.name!r} draws a figure but its entry names none")
        png = plotting.figure_png(figure)
        (self.run_dir / name).write_bytes(png)
        self.figures[name] = self.section.name
        return figure_tag(png, name, alt, caption)

    def source_note(self, *paths: Path | None) -> Html:
        names = ", ".join(self.rel(p) for p in paths if p is not None)
        return paragraph(f"Source: {names}", "muted")

    def sources_of(self, *names: str) -> Html:
        return self.source_note(*(self.path(name) for name in names))


Rendered = tuple[Html, Any]  # the section's HTML body and its summary.json entry


@dataclass(frozen=True)
class Section:
    """One report section.

    Attributes:
        name: the anchor and the summary.json key.
        title: shown as the heading.
        artifacts: artifact names (see `artifacts.ARTIFACTS`) the section needs; when one is
            missing the section is skipped.
        render: draws the section from a `Context`; returns (body, summary) or raises `Skip`.
        figure: the PNG file the section writes, if any.
    """

    name: str
    title: str
    artifacts: tuple[str, ...]
    render: Callable[[Context], Rendered]
    figure: str | None = None


# -- shared helpers ---------------------------------------------------------------------------


def is_harmless_group(group: str) -> bool:
    """Whether a group name denotes harmless prompts ('harmless', 'benign', 'normal')."""
    name = str(group).lower()
    return any(word in name for word in HARMLESS_GROUP_WORDS)


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


def _group_stats(rows: Sequence[dict]) -> dict[str, dict]:
    stats: dict[str, dict] = {}
    for group in dict.fromkeys(r["group"] for r in rows):
        members = [r for r in rows if r["group"] == group]
        ms = [r["ms"] for r in members if r["ms"] is not None]
        stats[group] = {
            "n": len(members),
            "n_with_ms": len(ms),
            "plateau_mean": _mean([r["plateau"] for r in members]),
            "final_mean": _mean([r["final"] for r in members]),
            "ms_mean": _mean(ms),
            "ms_max": max(ms) if ms else None,
            "drop_mean": _mean([r["drop"] for r in members]),
        }
    return stats


def _require(condition: Any, reason: str) -> None:
    if not condition:
        raise Skip(reason)


# -- sections ------------------------------------------------------------------------------


def render_notes(ctx: Context) -> Rendered:
    notes = ctx.get("demo.json")
    rows = []
    for key, value in notes.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        rows.append([str(key), text_block(text, NOTE_CHARS)])
    return join(table(["key", "value"], rows, "notes"), ctx.sources_of("demo.json")), notes


def render_prober(ctx: Context) -> Rendered:
    prober = ctx.get("prober.json")
    facts = [
        ["model", prober["model_id"] or "—"],
        ["layer", prober["layer"]],
        ["final norm applied", prober["final_norm_applied"]],
        ["d_model", prober["d_model"]],
    ]
    if prober["quality"] is not None:
        facts.append(["quality", prober["quality"]])
    facts += [[key.replace("_", " "), value] for key, value in prober["metrics"].items()]
    parts = [table(["", "value"], facts, "facts")]
    if prober["history"]:
        parts.append(
            ctx.figure(
                plotting.plot_prober_history(prober["history"]),
                "prober loss and accuracy per epoch",
                "Loss, validation accuracy and OOD accuracy of the refusal prober per epoch.",
            )
        )
        keys = ("epoch", "train_loss", "val_loss", "val_accuracy", "ood_accuracy")
        parts.append(
            table(
                ["epoch", "train loss", "val loss", "val accuracy", "OOD accuracy"],
                [[h[k] for k in keys] for h in prober["history"]],
            )
        )
    parts.append(ctx.sources_of("prober.json"))
    summary = {
        key: prober[key]
        for key in (
            "model_id",
            "model_revision",
            "layer",
            "d_model",
            "final_norm_applied",
            "metrics",
            "history",
        )
    }
    return join(*parts), summary


def _curve_stats(curve: Mapping[str, Any]) -> dict:
    mean = np.asarray(curve["mean"], float)  # [points]
    return {
        "n": curve.get("n"),
        "max": float(np.nanmax(mean)),
        "last": float(mean[-1]),
        "max_minus_last": float(np.nanmax(mean) - mean[-1]),
        "mean": float(np.nanmean(mean)),
        "end_template_start": curve.get("end_template_start"),
    }


def render_traces(ctx: Context) -> Rendered:
    curves = ctx.get("curves.json")
    _require(curves, f"{ctx.rel(ctx.path('curves.json'))} holds no groups")
    stats = {group: _curve_stats(curve) for group, curve in curves.items()}
    figure = ctx.figure(
        plotting.plot_traces(curves),
        "averaged refusal-score traces",
        "Averaged refusal score over normalised positions (band: ±1 std); "
        "the end-template region is shaded orange.",
    )
    rows = [
        [group, s["n"], s["max"], s["last"], s["max_minus_last"], s["end_template_start"]]
        for group, s in stats.items()
    ]
    body = table(
        ["group", "n", "max of mean trace", "mean trace at 100", "max − last", "end template starts at"], rows
    )
    return join(figure, body, ctx.sources_of("curves.json")), stats


def render_cliff(ctx: Context) -> Rendered:
    rows = ctx.get("cliff.jsonl")
    _require(rows, f"{ctx.rel(ctx.path('cliff.jsonl'))} is empty")
    stats = _group_stats(rows)
    keys = ("n", "plateau_mean", "final_mean", "ms_mean", "ms_max", "drop_mean")
    headers = ["group", "n", "mean plateau I", "mean final I'", "mean MS", "max MS", "mean largest drop"]
    body = table(headers, [[g, *(s[k] for k in keys)] for g, s in stats.items()])
    return join(body, ctx.sources_of("cliff.jsonl")), stats


def _tokens(name: str) -> set[str]:
    return {token for token in re.split(r"[^a-z0-9]+", name.lower()) if token}


def _generation_lookup(ctx: Context, cliff_path: Path, group: str) -> list[Path]:
    """generations.jsonl files to look an example up in, best first.

    Prompt ids are row indices, so harmful and harmless runs share ids; prefer a folder whose
    name shares a word with the group (`generate_harmful/` for `harmful` or `harmful_complied`),
    then the cliff's own folder, then the run folder, then the others (by name).
    """
    group_tokens = _tokens(group)

    def rank(path: Path) -> int:
        folder = path.parent
        if folder != ctx.run_dir and group_tokens & _tokens(folder.name):
            return 0
        if folder == cliff_path.parent:
            return 1
        return 2 if folder == ctx.run_dir else 3

    return sorted(ctx.artifacts.generations, key=rank)


def _find_generation(ctx: Context, cliff_path: Path, row: dict) -> tuple[Path | None, dict, dict | None]:
    """(generations.jsonl path, generation record, label record) of a cliff row, ({} when not found)."""
    for path in _generation_lookup(ctx, cliff_path, row["group"]):
        if row["id"] in ctx.artifacts.generations[path]:
            return path, ctx.artifacts.generations[path][row["id"]], ctx.artifacts.labels[path].get(row["id"])
    return None, {}, None


def _top_examples(rows: Sequence[dict], top: int) -> list[dict]:
    """The `top` rows with the largest MS; harmful groups only when there are any (the cliff is about them)."""
    scored = [r for r in rows if r["ms"] is not None]
    harmful = [r for r in scored if not is_harmless_group(r.get("group") or "")]
    return sorted(harmful or scored, key=lambda r: r["ms"], reverse=True)[:top]


def render_examples(ctx: Context) -> Rendered:
    cliff_path = ctx.path("cliff.jsonl")
    chosen = _top_examples(ctx.get("cliff.jsonl"), ctx.top_examples)
    _require(chosen, "no example in cliff.jsonl has a misalignment score")
    table_rows, summary_rows, sources = [], [], set()
    for rank, row in enumerate(chosen, start=1):
        path, generation, labels = _find_generation(ctx, cliff_path, row)
        if path is not None:
            sources |= {path} | ({path.parent / "labels.jsonl"} if labels is not None else set())
        refusal = labels.get("refusal") if labels else None
        refusal = refusal if isinstance(refusal, bool) else None
        table_rows.append(
            [
                rank,
                row["id"],
                row["group"],
                row["plateau"],
                row["final"],
                row["ms"],
                refusal,
                text_block(generation.get("prompt"), PROMPT_CHARS),
                text_block(generation.get("thinking"), THINKING_CHARS, keep_tail=True),
                text_block(generation.get("answer"), ANSWER_CHARS),
            ]
        )
        summary_rows.append(
            {
                "rank": rank,
                "id": row["id"],
                "group": row["group"],
                "plateau": row["plateau"],
                "final": row["final"],
                "ms": row["ms"],
                "refusal": refusal,
                "text_found": bool(generation),
            }
        )
    if sources:
        ctx.sources["generations.jsonl"] = sorted(
            ctx.rel(p) for p in sources if p.name == "generations.jsonl"
        )
    note = Html("") if sources else paragraph("No generations.jsonl holds these ids: no texts.", "muted")
    headers = ["#", "id", "group", "plateau I", "final I'", "MS", "refused", "prompt", "thinking", "answer"]
    intro = paragraph(
        f'The {len(chosen)} examples with the largest MS = I − I\' (long texts are cut, marked "…").'
    )
    body = join(
        intro, note, table(headers, table_rows, "examples"), ctx.source_note(cliff_path, *sorted(sources))
    )
    return body, summary_rows


def _token_span(token: TraceToken) -> Html:
    """One token, shaded by its refusal score (white 0 → red 1), the score and region on hover."""
    score = token["score"]
    shade = 0.0 if score is None or not np.isfinite(score) else min(max(score, 0.0), 1.0)
    text = token["token"].replace("\n", "↵\n")  # a newline shows as ↵ and still breaks the line
    css = "tok end" if token["region"] == "end_template" else "tok"
    hover = f"{fmt(score)} · {token['region']} · position {token['position']}"
    return Html(
        f'<span class="{css}" style="background:rgba(207,34,46,{shade:.3f})" '
        f'title="{escape(hover)}">{escape(text)}</span>'
    )


def render_tokens(ctx: Context) -> Rendered:
    """The tail of the thinking and the end template of the top examples, token by token."""
    chosen = _top_examples(ctx.get("cliff.jsonl"), min(TOKEN_VIEW_EXAMPLES, ctx.top_examples))
    _require(chosen, "no example in cliff.jsonl has a misalignment score")
    path = ctx.path("traces.parquet")
    ctx.sources["traces.parquet"] = [ctx.rel(path)]
    tokens = read_trace_tokens(path, [row["id"] for row in chosen])
    _require(tokens, f"{ctx.rel(path)} holds none of the examples of cliff.jsonl")
    blocks, summary = [], []
    for row in chosen:
        example = tokens.get(row["id"])
        if not example:
            continue
        thinking = [i for i, token in enumerate(example) if token["region"] == "thinking"]
        start = max(thinking[-1] - TOKEN_VIEW_THINKING + 1, 0) if thinking else len(example)
        shown = [t for t in example[start:] if t["region"] in ("thinking", "end_template")]
        caption = (
            f"{row['id']} ({row['group']}): plateau I = {fmt(row['plateau'])}, final I' = {fmt(row['final'])}, "
            f"MS = {fmt(row['ms'])}; the last {len(shown)} tokens"
        )
        blocks.append(
            join(
                paragraph(caption),
                Html('<div class="tokens">'),
                Html("…" if start > 0 else ""),
                *(_token_span(token) for token in shown),
                Html("</div>"),
            )
        )
        summary.append(
            {"id": row["id"], "group": row["group"], "ms": row["ms"], "n_tokens_shown": len(shown)}
        )
    _require(blocks, f"{ctx.rel(path)} holds none of the examples of cliff.jsonl")
    intro = paragraph(
        f"The tail of the thinking and the thinking-end template (boxed) of the {len(blocks)} examples with "
        "the largest MS, each token shaded by the refusal score the prober reads at it (white 0, red 1; "
        "hover for the score). A cliff shows as red thinking that turns white in the end template."
    )
    return join(intro, *blocks, ctx.sources_of("cliff.jsonl", "traces.parquet")), summary


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


def render_layerwise(ctx: Context) -> Rendered:
    layers = ctx.get("layerwise.json")
    group = _preferred_group(list(dict.fromkeys(g for layer in layers.values() for g in layer["groups"])))
    traces = {name: layer["groups"][group] for name, layer in layers.items() if group in layer["groups"]}
    # The shown group's own mean MS per layer where the producer wrote it, else the layer's overall one.
    ms_mean = {
        name: layer["group_ms_mean"].get(group)
        if layer["group_ms_mean"].get(group) is not None
        else layer["ms_mean"]
        for name, layer in layers.items()
    }
    _require(
        traces or any(v is not None for v in ms_mean.values()),
        f"{ctx.rel(ctx.path('layerwise.json'))} holds no layers",
    )
    curves = ctx.artifacts.data.get("curves.json") or {}
    end_start = curves[group].get("end_template_start") if group in curves else None
    figure = ctx.figure(
        plotting.plot_layerwise(traces, ms_mean, end_start, group),
        "per-layer refusal-score traces",
        f"Averaged refusal-score traces of group '{group}' at each probed layer (shallow: "
        "dark, deep: yellow); right: mean misalignment score per layer.",
    )
    summary = {
        name: {
            "ms_mean": ms_mean[name],
            "ms_mean_all_groups": layer["ms_mean"],
            **(
                {"max": float(np.nanmax(layer["groups"][group])), "last": layer["groups"][group][-1]}
                if group in layer["groups"]
                else {}
            ),
        }
        for name, layer in layers.items()
    }
    body = table(
        ["layer", "mean MS", "max of mean trace", "mean trace at 100"],
        [[name, s["ms_mean"], s.get("max"), s.get("last")] for name, s in summary.items()],
    )
    return join(figure, body, ctx.sources_of("layerwise.json")), {"group": group, "layers": summary}


def render_plateau(ctx: Context) -> Rendered:
    stats = _group_stats(ctx.get("cliff.jsonl"))
    harmful = {g: s for g, s in stats.items() if not is_harmless_group(g) and s["plateau_mean"] is not None}
    _require(harmful, "cliff.jsonl has no harmful group")
    curves = ctx.get("curves.json")
    harmless_groups = [g for g in curves if is_harmless_group(g)]
    _require(harmless_groups, "needs a harmless group in curves.json for the reference score")
    # Mean refusal score over the whole (normalised) trace of harmless prompts, averaged over
    # harmless groups weighted by their sizes.
    weights = [curves[g].get("n") or 1 for g in harmless_groups]
    harmless_score = float(
        np.average([np.nanmean(curves[g]["mean"]) for g in harmless_groups], weights=weights)
    )
    plateaus = {g: s["plateau_mean"] for g, s in harmful.items()}
    finals = {g: s["final_mean"] for g, s in harmful.items()}
    figure = ctx.figure(
        plotting.plot_plateau_vs_harmless(plateaus, finals, harmless_score),
        "plateau vs harmless score",
        "Mean plateau I and final score I' of harmful prompts; the gray line is the mean "
        "refusal score over harmless prompts' traces.",
    )
    rows = [[g, plateaus[g], finals[g], plateaus[g] - harmless_score] for g in harmful]
    body = table(["harmful group", "mean plateau I", "mean final I'", "plateau − harmless score"], rows)
    intro = Html(
        f"<p>Mean harmless-prompt refusal score: <b>{escape(fmt(harmless_score))}</b> "
        f"(groups: {escape(', '.join(harmless_groups))}).</p>"
    )
    summary = {
        "harmless_groups": harmless_groups,
        "harmless_score": harmless_score,
        "groups": {
            g: {
                "plateau_mean": plateaus[g],
                "final_mean": finals[g],
                "plateau_minus_harmless": plateaus[g] - harmless_score,
            }
            for g in harmful
        },
    }
    return join(intro, figure, body), summary


def render_clipping(ctx: Context) -> Rendered:
    rows = ctx.get("clipping.json")
    _require(rows, f"{ctx.rel(ctx.path('clipping.json'))} is empty")
    figure = ctx.figure(
        plotting.plot_clipping(rows),
        "cliff vs thinking clipping",
        "Final score, cliff (MS) and refusal rate as the thinking is clipped.",
    )
    keys = ("fraction", "final_mean", "ms_mean", "drop_mean", "refusal_rate", "n")
    headers = [
        "fraction of thinking kept",
        "mean final I'",
        "mean MS",
        "mean largest drop",
        "refusal rate",
        "n",
    ]
    body = table(headers, [[r[k] if k != "n" or r[k] is None else int(r[k]) for k in keys] for r in rows])
    return join(figure, body, ctx.sources_of("clipping.json")), [{k: r[k] for k in keys} for r in rows]


def _heads_run_facts(heads_path: Path) -> tuple[float, dict[tuple[int, int], str]]:
    """(prober bias, {(layer, head): smallest threshold}) from the `heads` run's metadata.json beside
    heads.json, so that the report draws the same figure as heads.png; (0, {}) without one."""
    path = heads_path.parent / "metadata.json"
    meta = read_json(path) if path.is_file() else {}
    if not isinstance(meta, dict) or meta.get("stage") != "heads":
        return 0.0, {}
    marks: dict[tuple[int, int], str] = {}
    thresholds = meta.get("suppression_heads") or {}
    for threshold in sorted(thresholds, key=float, reverse=True):
        marks.update(
            {(int(layer), int(head)): f"{float(threshold):g}" for layer, head in thresholds[threshold]}
        )
    bias = meta.get("prober_bias")
    return (float(bias) if isinstance(bias, (int, float)) else 0.0), marks


def render_heads(ctx: Context) -> Rendered:
    heads = ctx.get("heads.json")
    _require(heads, f"{ctx.rel(ctx.path('heads.json'))} is empty")
    prober = ctx.artifacts.data.get("prober.json")
    prober_layers = prober.get("n_layers") if prober else None
    n_layers = None
    if isinstance(prober_layers, int) and prober_layers > max(h["layer"] for h in heads):
        n_layers = prober_layers  # show layers without scored heads as blank rows
    bias, marks = _heads_run_facts(ctx.path("heads.json"))
    matrix = plotting.heads_matrix(heads, n_layers=n_layers) - bias  # [n_layers, n_heads]
    figure = ctx.figure(
        plotting.plot_heads(matrix, marks=marks),
        "per-head contribution heatmap",
        "Mean contribution of each attention head to the refusal score at t_cliff "
        "(red: towards refusal, blue: suppresses refusal); outlined: suppression heads, "
        "labelled with the smallest threshold that selects them.",
    )
    top = heads[:10]
    keys = ("rank", "layer", "head", "contribution", "contribution_exact", "std")
    body = table(
        ["rank", "layer", "head", "contribution", "exact contribution", "std"],
        [[h[k] for k in keys] for h in top],
    )
    summary = {
        "n_heads_scored": len(heads),
        "shape": list(matrix.shape),
        "prober_bias": bias,
        "min": float(np.nanmin(matrix)),
        "max": float(np.nanmax(matrix)),
        "top_suppression_heads": [{k: h[k] for k in keys} for h in top],
    }
    return join(
        figure, heading("Strongest refusal-suppression heads"), body, ctx.sources_of("heads.json")
    ), summary


def render_ablation(ctx: Context) -> Rendered:
    rows = ctx.get("ablation.json")
    _require(rows, f"{ctx.rel(ctx.path('ablation.json'))} is empty")
    controls = {r["control"] for r in rows}
    caption = (
        "Refusal score at the last token, ASR and benign refusal rate as more refusal-suppression heads "
        "are ablated."
    )
    if "random" in controls:
        caption += (
            " Gray: the same number of heads drawn at random from outside the ranked ones (dashed: mean "
            "over seeds, band: min to max)."
        )
    if "boost" in controls:
        caption += " Dotted: the ranked heads ablated while every other head is scaled by the boost factor."
    figure = ctx.figure(plotting.plot_ablation(rows), "ablation results", caption)
    keys = (
        "threshold",
        "control",
        "seed",
        "boost_others",
        "n_heads",
        "gamma",
        "renormalize",
        "final_score_mean",
        "asr",
        "benign_refusal_rate",
        "n_harmful",
        "n_benign",
    )
    headers = [
        "threshold",
        "heads ablated",
        "seed",
        "others ×",
        "heads",
        "γ",
        "renormalised",
        "mean final score",
        "ASR",
        "benign refusal rate",
        "n harmful",
        "n benign",
    ]
    body = table(
        headers,
        [
            [
                pct(r["threshold"]),
                r["control"],
                r["seed"],
                r["boost_others"],
                r["n_heads"],
                r["gamma"],
                r["renormalize"],
                r["final_score_mean"],
                pct(r["asr"]),
                pct(r["benign_refusal_rate"]),
                r["n_harmful"],
                r["n_benign"],
            ]
            for r in rows
        ],
    )
    parts = [figure]
    if "random" in controls:
        comparison = []
        for threshold in sorted({r["threshold"] for r in rows if r["control"] == "random"}):
            ranked = [r for r in rows if r["threshold"] == threshold and r["control"] == "ranked"]
            drawn = [r for r in rows if r["threshold"] == threshold and r["control"] == "random"]
            for key, name in (("final_score_mean", "mean final score"), ("asr", "ASR")):
                values = [r[key] for r in drawn if r[key] is not None]
                comparison.append(
                    [
                        pct(threshold),
                        name,
                        ranked[0][key] if ranked else None,
                        _mean(values),
                        min(values) if values else None,
                        max(values) if values else None,
                        len(values),
                    ]
                )
        parts += [
            heading("Ranked heads vs random heads"),
            table(
                [
                    "threshold",
                    "metric",
                    "ranked heads",
                    "random: mean",
                    "random: min",
                    "random: max",
                    "seeds",
                ],
                comparison,
            ),
        ]
    parts += [body, ctx.sources_of("ablation.json")]
    return join(*parts), [{k: r[k] for k in keys} for r in rows]


def render_patterns(ctx: Context) -> Rendered:
    data = ctx.get("patterns.json")
    _require(data["mass_mean"], f"{ctx.rel(ctx.path('patterns.json'))} holds no head")
    heatmap = data["heatmap"]
    figure = ctx.figure(
        plotting.plot_head_patterns(data["mass_mean"], heatmap),
        "attention patterns of the top suppression heads",
        "Left: where each top suppression head looks from t_cliff (its attention mass on the "
        "prompt, the thinking and the end template, mean over the examples). Right: the weights over "
        f"every token of example {heatmap['id'] if heatmap else '—'}.",
    )
    rows = [
        [
            f"L{h['layer']}.H{h['head']}",
            h["rank"],
            h["contribution"],
            h["prompt"],
            h["thinking"],
            h["end_template"],
        ]
        for h in data["mass_mean"]
    ]
    mass = table(
        ["head", "rank", "contribution", "mass on prompt", "mass on thinking", "mass on end template"], rows
    )
    top_rows = []
    if data["examples"]:
        example = data["examples"][0]
        for entry in example.get("heads", []):
            tokens = ", ".join(
                f"{t['token']!r}@{t['position']} ({t['region']}) {t['weight']:.2f}"
                for t in entry.get("top", [])[:5]
            )
            top_rows.append([f"L{entry['layer']}.H{entry['head']}", text_block(tokens, NOTE_CHARS)])
    parts = [figure, mass]
    if top_rows:
        parts += [
            heading(
                f"Most attended tokens, example {data['examples'][0].get('id')} (first 5 of {data['top']})"
            ),
            table(["head", "token@position (region) weight"], top_rows),
        ]
    summary = {
        "n_examples": len(data["examples"]),
        "heads": data["mass_mean"],
        "heatmap_example": heatmap["id"] if heatmap else None,
    }
    return join(*parts, ctx.sources_of("patterns.json")), summary


def render_direction(ctx: Context) -> Rendered:
    data = ctx.get("directions.json")
    _require(data["layers"], f"{ctx.rel(ctx.path('directions.json'))} holds no layer")
    curves = ctx.artifacts.data.get("curves.json")
    direction_curves = (
        ctx.get("direction_curves.json") if "direction_curves.json" in ctx.artifacts.paths else None
    )
    if (
        direction_curves is not None
        and ctx.path("direction_curves.json").parent != ctx.path("curves.json").parent
    ):
        direction_curves = None  # overlay only the two curves of one trace run
    cosines = {name: layer["cosine_to_prober"] for name, layer in data["layers"].items()}
    figure = ctx.figure(
        plotting.plot_direction(curves, direction_curves, cosines, data["prober_layer"]),
        "difference-in-means direction vs prober",
        (
            "Left: per group, the prober's mean refusal score (solid) and the mean standardised "
            "projection on the difference-in-means direction (dashed, right axis) over normalised "
            "positions. "
            if direction_curves
            else ""
        )
        + "Right: cosine between each layer's difference-in-means direction and the prober's weight.",
    )
    rows = [
        [
            name,
            layer["norm"],
            layer["cosine_to_prober"],
            layer["accuracy"],
            layer["refused_mean"],
            layer["complied_mean"],
        ]
        for name, layer in data["layers"].items()
    ]
    body = table(
        [
            "layer",
            "|refused mean − complied mean|",
            "cosine to the prober",
            "classes separated by the projection",
            "refusals (std units)",
            "compliances (std units)",
        ],
        rows,
    )
    intro = paragraph(
        f"Difference of the mean last-token activations of {data['n_refused']} refusals to harmful "
        f"prompts and {data['n_complied']} compliant answers to harmless prompts (the prober's data)."
    )
    summary: dict = {
        "prober_layer": data["prober_layer"],
        "n_refused": data["n_refused"],
        "n_complied": data["n_complied"],
        "layers": data["layers"],
    }
    if direction_curves:
        summary["curves"] = {group: _curve_stats(curve) for group, curve in direction_curves.items()}
    return join(
        intro,
        figure,
        body,
        ctx.sources_of("directions.json", *(("direction_curves.json",) if direction_curves else ())),
    ), summary


def _ms_of(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    return [r["ms"] for r in rows if r["ms"] is not None]


def render_selection(ctx: Context) -> Rendered:
    scores, selected, meta = (
        ctx.get("scores.jsonl"),
        ctx.get("selection.jsonl"),
        ctx.get("metadata.select.json"),
    )
    folders = {ctx.path(name).parent for name in ("scores.jsonl", "selection.jsonl", "metadata.select.json")}
    _require(
        len(folders) == 1, "scores.jsonl, selection.jsonl and metadata.select.json are in different folders"
    )
    _require(scores, f"{ctx.rel(ctx.path('scores.jsonl'))} is empty")
    ms_all, ms_selected = _ms_of(scores), _ms_of(selected)
    figure = ctx.figure(
        plotting.plot_ms_histogram(ms_all, ms_selected, meta["method"]),
        "misalignment scores of all and selected candidates",
        "Misalignment score MS = I − I' of every candidate (gray) and of the selected ones "
        "(red, with a mark under the axis for each).",
    )
    summary = {
        "method": meta["method"],
        "k": meta["k"],
        "resolved_k": meta["resolved_k"],
        "n_candidates": meta["n_candidates"],
        "n_selected": meta["n_selected"],
        "n_without_ms": len(scores) - len(ms_all),
        "ms_mean_selected": _mean(ms_selected),
        "ms_mean_all": _mean(ms_all),
        "top_selected": [{k: r[k] for k in ("rank", "id", "ms")} for r in selected[:SELECTED_SHOWN]],
    }
    facts = table(
        ["method", "k", "n candidates", "n selected", "mean MS of the selection", "mean MS of all"],
        [
            [
                meta["method"],
                meta["k"] if meta["resolved_k"] is None else f"{meta['k']} → {meta['resolved_k']}",
                meta["n_candidates"],
                meta["n_selected"],
                summary["ms_mean_selected"],
                summary["ms_mean_all"],
            ]
        ],
    )
    listing = table(
        ["rank", "id", "MS", "plateau I", "final I'", "model refused", "prompt"],
        [
            [
                r["rank"],
                r["id"],
                r["ms"],
                r["plateau"],
                r["final"],
                r["refusal"],
                text_block(r["prompt"], PROMPT_CHARS),
            ]
            for r in selected[:SELECTED_SHOWN]
        ],
        "examples",
    )
    body = join(
        facts,
        figure,
        heading(f"Selected candidates (first {min(SELECTED_SHOWN, len(selected))})"),
        listing,
        ctx.sources_of("scores.jsonl", "selection.jsonl", "metadata.select.json"),
    )
    return body, summary


def render_evaluation(ctx: Context) -> Rendered:
    data = ctx.get("evaluation.json")
    models, asr_vs_k = data["models"], data["asr_vs_k"]
    _require(models or asr_vs_k, f"{ctx.rel(ctx.path('evaluation.json'))} holds no models")
    tasks = list(dict.fromkeys(t for m in models for t in m["tasks"]))
    show_method = any(m["method"] for m in models)
    show_k = any(m["k"] is not None for m in models)
    headers = (
        ["model"]
        + (["method"] if show_method else [])
        + (["examples"] if show_k else [])
        + ["ASR", "over-refusal", "mean final score"]
        + tasks
    )
    rows = [
        [m["model"]]
        + ([m["method"] or "—"] if show_method else [])
        + ([None if m["k"] is None else int(m["k"])] if show_k else [])
        + [pct(m["asr"]), pct(m["over_refusal"]), m["final_score_mean"]]
        + [m["tasks"].get(t) for t in tasks]
        for m in models
    ]
    parts = [table(headers, rows)] if models else []
    if asr_vs_k:
        parts.append(
            ctx.figure(
                plotting.plot_asr_vs_k(asr_vs_k),
                "ASR vs examples",
                "ASR after fine-tuning vs the number of training examples, per selection method.",
            )
        )
    parts.append(ctx.sources_of("evaluation.json"))
    return join(*parts), {"models": models, "asr_vs_k": asr_vs_k}


def render_guard(ctx: Context) -> Rendered:
    rows = ctx.get("guard.json")
    _require(rows, f"{ctx.rel(ctx.path('guard.json'))} is empty")
    ablation = ctx.get("ablation.json")
    evaluation = ctx.get("evaluation.json")
    models = evaluation["models"] if evaluation else []
    figure = ctx.figure(
        plotting.plot_guard(rows, ablation, models),
        "cliff guard trade-off",
        "ASR against benign refusal rate as the guard's tau varies (the unguarded model is one "
        "end), next to the global head ablation and fine-tuned models where the run has them.",
    )
    metadata_path = ctx.path("guard.json").parent / "metadata.json"
    metadata = read_json(metadata_path) if metadata_path.is_file() else {}
    prober = metadata.get("prober") or {}
    settings = metadata.get("config") or {}
    facts = [
        f"action: {settings.get('action', rows[0].get('action'))}",
        f"rule: {settings.get('rule', rows[0].get('rule'))}",
    ]
    if prober.get("layer") is not None:
        facts.append(f"prober layer: {prober['layer']}")
    if settings.get("action") == "ablate" and settings.get("heads"):
        facts.append(
            f"heads scaled on flagged examples: {len(settings['heads'])} (γ={settings.get('gamma')})"
        )
    notes = ctx.get("demo.json") or {}
    intro = [paragraph("; ".join(str(f) for f in facts))]
    if notes.get("guard prober"):
        intro.append(paragraph(str(notes["guard prober"])[:NOTE_CHARS]))
    keys = (
        "tau",
        "asr",
        "benign_refusal_rate",
        "flag_rate_harmful",
        "flag_rate_benign",
        "n_harmful",
        "n_benign",
    )
    headers = [
        "tau",
        "ASR",
        "benign refusal rate",
        "flagged (harmful)",
        "flagged (benign)",
        "n harmful",
        "n benign",
    ]
    body = table(
        headers,
        [
            [
                "unguarded" if r["tau"] is None else r["tau"],
                pct(r["asr"]),
                pct(r["benign_refusal_rate"]),
                pct(r["flag_rate_harmful"]),
                pct(r["flag_rate_benign"]),
                r["n_harmful"],
                r["n_benign"],
            ]
            for r in rows
        ],
    )
    sources = ["guard.json"] + [
        name for name in ("ablation.json", "evaluation.json") if ctx.path(name) is not None
    ]
    summary = {
        "rows": [{k: r[k] for k in keys} for r in rows],
        "action": settings.get("action"),
        "prober_layer": prober.get("layer"),
    }
    return join(*intro, figure, body, ctx.sources_of(*sources)), summary


# -- the registry: one entry per section, in report order -----------------------------------


def render_components(ctx: Context) -> Rendered:
    data = ctx.get("components.json")
    _require(data["components"], f"{ctx.rel(ctx.path('components.json'))} lists no component")
    logit, classes = data["logit"], data["by_class"]
    figure = ctx.figure(
        plotting.plot_components(data),
        "what makes the cliff",
        "Left: the change of the prober logit across the thinking-end template (last end-template "
        "token minus last thinking token), split exactly into attention heads, o_proj biases and "
        "MLPs per layer, and the embeddings. Middle: the 20 components with the largest change "
        "(mean ± std over the group). Right: where the 10 largest push, as the step of their term "
        "at each end-template token.",
    )
    norm = "final norm applied" if data.get("final_norm_applied") else "no final norm"
    intro = paragraph(
        f"Prober at layer {data.get('layer')} ({norm}), group {data.get('group')}, n={data.get('n_examples')}: "
        f"the logit goes from {fmt(logit['last_thinking_mean'])} at "
        f"the last thinking token to {fmt(logit['t_cliff_mean'])} at t_cliff (change {fmt(logit['change_mean'])}). "
        f"Each example's terms sum to its logit within {fmt(data.get('exact_max_error'))} and to its change within "
        f"{fmt(data.get('change_max_error'))}."
    )
    class_rows = [
        [
            name,
            values["change_mean"],
            values["t_cliff_mean"],
            pct(values["change_mean"] / logit["change_mean"]) if abs(logit["change_mean"]) > 1e-12 else "—",
        ]
        for name, values in classes.items()
    ]
    by_class = table(
        ["component class", "change across the end template", "term at t_cliff", "share of the change"],
        class_rows,
    )
    top = data["components"][:10]
    top_table = table(
        ["rank", "component", "class", "change (mean)", "std", "term at t_cliff"],
        [
            [
                c.get("rank"),
                c["name"],
                c.get("component_class"),
                c["change_mean"],
                c["change_std"],
                c["t_cliff_mean"],
            ]
            for c in top
        ],
    )
    parts = [
        intro,
        figure,
        heading("Change by component class"),
        by_class,
        heading("Components that carry the drop (most negative change first)"),
        top_table,
    ]
    summary = {
        "layer": data.get("layer"),
        "n_examples": data.get("n_examples"),
        "logit": logit,
        "by_class": classes,
        "top": [{k: c.get(k) for k in ("name", "change_mean", "t_cliff_mean")} for c in top],
    }
    ablation = ctx.get("component_ablation.json")
    if ablation:
        parts += [
            heading("Ablating components (γ scales their output; ASR as measured)"),
            table(
                [
                    "condition",
                    "components",
                    "γ",
                    "mean final score",
                    "ASR",
                    "benign refusal rate",
                    "n harmful",
                ],
                [
                    [
                        r["condition"],
                        ", ".join(r["components"]) or "—",
                        r["gamma"],
                        r["final_score_mean"],
                        pct(r["asr"]),
                        pct(r["benign_refusal_rate"]),
                        r["n_harmful"],
                    ]
                    for r in ablation
                ],
            ),
        ]
        summary["ablation"] = [
            {k: r[k] for k in ("condition", "components", "asr", "final_score_mean")} for r in ablation
        ]
    parts.append(ctx.sources_of("components.json", *(("component_ablation.json",) if ablation else ())))
    return join(*parts), summary


SECTIONS: tuple[Section, ...] = (
    Section("notes", "Run notes", ("demo.json",), render_notes),
    Section("prober", "Refusal prober (Figure 3)", ("prober.json",), render_prober, "fig_prober.png"),
    Section("traces", "Refusal-score traces (Figure 4)", ("curves.json",), render_traces, "fig_traces.png"),
    Section("cliff", "Cliff metrics per group", ("cliff.jsonl",), render_cliff),
    Section(
        "tokens",
        "The cliff token by token",
        ("cliff.jsonl", "traces.parquet"),
        render_tokens,
    ),
    Section("examples", "Examples with the largest misalignment score", ("cliff.jsonl",), render_examples),
    Section(
        "layerwise",
        "Layer-wise traces (Figure 5, left)",
        ("layerwise.json",),
        render_layerwise,
        "fig_layerwise.png",
    ),
    Section(
        "plateau",
        "Plateau vs harmless prompts (Figure 5, second column)",
        ("cliff.jsonl", "curves.json"),
        render_plateau,
        "fig_plateau.png",
    ),
    Section(
        "clipping",
        "Thinking clipping (Figure 5, third and fourth columns)",
        ("clipping.json",),
        render_clipping,
        "fig_clipping.png",
    ),
    Section(
        "direction",
        "Difference-in-means direction beside the prober",
        ("directions.json",),
        render_direction,
        "fig_direction.png",
    ),
    Section(
        "heads", "Attention-head contributions (Figure 6)", ("heads.json",), render_heads, "fig_heads.png"
    ),
    Section(
        "patterns",
        "Where the top suppression heads look at t_cliff",
        ("patterns.json",),
        render_patterns,
        "fig_patterns.png",
    ),
    Section(
        "ablation",
        "Ablating refusal-suppression heads (Figure 8)",
        ("ablation.json",),
        render_ablation,
        "fig_ablation.png",
    ),
    Section(
        "components",
        "What makes the cliff: heads, MLPs and embeddings across the end template",
        ("components.json",),
        render_components,
        "fig_components.png",
    ),
    Section(
        "guard",
        "Cliff guard: act only where the cliff happens",
        ("guard.json",),
        render_guard,
        "fig_guard.png",
    ),
    Section(
        "selection",
        "Cliff-as-a-Judge selection",
        ("scores.jsonl", "selection.jsonl", "metadata.select.json"),
        render_selection,
        "fig_selection.png",
    ),
    Section(
        "evaluation",
        "Safety fine-tuning evaluation (Table 2, Figure 7)",
        ("evaluation.json",),
        render_evaluation,
        "fig_asr_vs_k.png",
    ),
)
FIGURE_NAMES = tuple(section.figure for section in SECTIONS if section.figure)


def missing_reason(section: Section, artifacts: RunArtifacts) -> str | None:
    """Why `section` cannot be rendered from what the run holds (None when it can)."""
    missing = [name for name in section.artifacts if name not in artifacts.paths]
    if not missing:
        return None
    commands = ", ".join(dict.fromkeys(f"`{ARTIFACTS[name].command}`" for name in missing))
    return f"no {', '.join(missing)} (run {commands})"

"""Every figure of the project, as functions that take plain data and return a `Figure`.

Why one module: the `heads`, `ablate` and `evaluate` stages save a PNG of their own and the
report embeds the same figures; two copies drifted apart (the heads heatmap ran its layer axis
the other way and cut its title off). Here each figure exists once, and a stage saves it with
`save_figure(plot_x(...), path)`.

Conventions:

- Figures use an Agg canvas and `constrained_layout` (no pyplot global state, nothing cut off),
  and long titles are wrapped to the figure's width.
- Labels drawn from data go through `plain_label`: a `$` would start mathtext, which can fail
  to parse on a model's or dataset's text.
- Scores and rates are fractions in [0, 1]; positions are normalised to 0–100.
- Heatmaps of heads are [n_layers, n_heads] arrays drawn with layer 0 at the bottom.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

FIGURE_DPI = 110
END_TEMPLATE_COLOR = "orange"
TITLE_CHARS_PER_INCH = 11  # a title wraps beyond about this many characters per inch of width


# -- helpers -------------------------------------------------------------------------------


def plain_label(label: Any) -> str:
    """Text for a matplotlib label: `$` would start mathtext (and can fail to parse)."""
    return str(label).replace("$", r"\$")


def _title(figure: Figure, text: str, share: float = 1.0) -> str:
    """`text` made safe for matplotlib and wrapped to `share` of the figure's width (the part the
    title is centred over), so it is never cut off."""
    width = max(20, int(share * figure.get_figwidth() * TITLE_CHARS_PER_INCH))
    return textwrap.fill(plain_label(text), width)


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


def _series(ax, rows: Sequence[Mapping[str, Any]], x_key: str, key: str, label: str, marker: str) -> None:
    """One line of `rows[key]` against `rows[x_key]`, skipping rows where the value is missing."""
    points = [(row[x_key], row[key]) for row in rows if row.get(key) is not None]
    if points:
        ax.plot(*zip(*points), marker=marker, label=label)


def _legend(*axes, **kwargs) -> None:
    for ax in axes:
        if ax.lines:
            ax.legend(frameon=False, **kwargs)


def figure_png(figure: Figure) -> bytes:
    """The PNG bytes of a figure."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI)
    return buffer.getvalue()


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write a figure as PNG (creating the folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(figure_png(figure))
    return path


# -- prober and traces ---------------------------------------------------------------------


def plot_prober_history(history: Sequence[Mapping[str, Any]]) -> Figure:
    """Figure 3: training/validation loss and validation/OOD accuracy per epoch.

    Args:
        history: per epoch {epoch, train_loss, val_loss, val_accuracy, ood_accuracy}; missing
            or None values are left out.
    """
    figure, (loss_ax, acc_ax) = _figure(9, 3.4, ncols=2)
    rows = [{**entry, "epoch": entry.get("epoch", i + 1)} for i, entry in enumerate(history)]
    _series(loss_ax, rows, "epoch", "train_loss", "train loss", "o")
    _series(loss_ax, rows, "epoch", "val_loss", "validation loss", "s")
    _series(acc_ax, rows, "epoch", "val_accuracy", "validation accuracy", "o")
    _series(acc_ax, rows, "epoch", "ood_accuracy", "OOD accuracy", "s")
    loss_ax.set(xlabel="epoch", ylabel="BCE loss", title="Loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(-0.02, 1.02))
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(loss_ax, acc_ax)
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
        (line,) = ax.plot(x, mean, lw=2, label=plain_label(label))
        if curve.get("std") is not None:
            std = np.asarray(curve["std"], float)  # [points]
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15, lw=0)
    ax.set(
        xlabel="normalised position (0 = first prompt token, 100 = last end-template token)",
        ylabel="refusal score",
        xlim=(0, 100),
        ylim=(-0.02, 1.02),
    )
    if title:
        ax.set_title(_title(figure, title))
    ax.legend(frameon=False, loc="best")
    return figure


def _layer_colorbar(figure: Figure, ax, names: Sequence[str], cmap, norm) -> None:
    """A depth colour bar with at most six layer names (a legend would not fit many layers)."""
    bar = figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax)
    ticks = np.linspace(0, len(names) - 1, min(6, len(names))).round().astype(int)
    bar.set_ticks(ticks.tolist(), labels=[plain_label(names[t]) for t in ticks])
    bar.set_label("layer")


def plot_layerwise(
    layers: Mapping[str, Sequence[float]],
    ms_mean: Mapping[str, float | None] | None = None,
    end_template_start: float | None = None,
    group: str | None = None,
) -> Figure:
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
        ax.plot(
            np.linspace(0, 100, len(mean)),
            mean,
            color=cmap(norm(index)),
            lw=1.6,
            label=plain_label(f"layer {layer}"),
        )
    ax.set(
        xlabel="normalised position",
        ylabel="refusal score",
        xlim=(0, 100),
        ylim=(-0.02, 1.02),
        title=plain_label(f"Per-layer traces ({group})" if group else "Per-layer traces"),
    )
    if 0 < len(layers) <= 8:
        ax.legend(frameon=False, fontsize="small")
    elif layers:
        _layer_colorbar(figure, ax, list(layers), cmap, norm)
    if has_ms:
        names = [name for name, value in ms_mean.items() if value is not None]
        axes[1].plot(range(len(names)), [ms_mean[name] for name in names], marker="o")
        axes[1].set_xticks(
            range(len(names)),
            [plain_label(name) for name in names],
            rotation=90 if len(names) > 12 else 0,
            fontsize="small",
        )
        axes[1].axhline(0, color="gray", lw=0.8)
        axes[1].set(xlabel="layer", ylabel="mean MS (plateau − final)", title="Cliff depth per layer")
    return figure


def plot_plateau_vs_harmless(
    plateaus: Mapping[str, float],
    finals: Mapping[str, float] | None = None,
    harmless_score: float | None = None,
) -> Figure:
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
    ax.bar(
        x - (width / 2 if finals else 0),
        [plateaus[g] for g in groups],
        width,
        label="plateau I",
        color="tab:red",
    )
    if finals:
        heights = [np.nan if finals.get(g) is None else finals[g] for g in groups]
        ax.bar(x + width / 2, heights, width, label="final I'", color="tab:blue")
    if harmless_score is not None:
        ax.axhline(harmless_score, color="gray", lw=2, ls="--", label="harmless prompts (mean score)")
    ax.set_xticks(x, [plain_label(g) for g in groups])
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
    _series(score_ax, rows, "fraction", "final_mean", "final score I'", "o")
    _series(score_ax, rows, "fraction", "ms_mean", "cliff MS = I − I'", "s")
    _series(score_ax, rows, "fraction", "drop_mean", "largest one-step drop", "^")
    _series(rate_ax, rows, "fraction", "refusal_rate", "refusal rate", "o")
    score_ax.set(xlabel="fraction of thinking kept", ylabel="score", title="Cliff vs clipping")
    rate_ax.set(
        xlabel="fraction of thinking kept",
        ylabel="refusal rate",
        ylim=(-0.02, 1.02),
        title="Refusals vs clipping",
    )
    _legend(score_ax, rate_ax, fontsize="small")
    return figure


# -- heads and ablation --------------------------------------------------------------------


def heads_matrix(
    heads: Sequence[Mapping[str, Any]],
    value: str = "value",
    n_layers: int | None = None,
    n_heads: int | None = None,
) -> np.ndarray:
    """[n_layers, n_heads] array of a per-head value from heads.json rows (NaN where absent)."""
    n_layers = n_layers or (max(int(h["layer"]) for h in heads) + 1 if heads else 0)
    n_heads = n_heads or (max(int(h["head"]) for h in heads) + 1 if heads else 0)
    matrix = np.full((n_layers, n_heads), np.nan)  # [n_layers, n_heads]
    for head in heads:
        if head.get(value) is not None:
            matrix[int(head["layer"]), int(head["head"])] = head[value]
    return matrix


def _mark_heads(ax, marks: Mapping[tuple[int, int], str]) -> None:
    """Outline each marked (layer, head) cell and write its label in it."""
    for (layer, head), label in marks.items():
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.2))
        ax.text(head, layer, plain_label(label), ha="center", va="center", fontsize=5)


def plot_heads(
    matrix: Any,
    title: str | None = None,
    marks: Mapping[tuple[int, int], str] | None = None,
    value_label: str = "contribution to the refusal logit (red: towards refusal)",
) -> Figure:
    """Figure 6: heatmap of per-head contributions, layers × heads, red positive / blue negative.

    Args:
        matrix: array-like [n_layers, n_heads]; NaN cells are left blank. Layer 0 is at the
            bottom; the diverging colormap is centred at 0 and symmetric.
        title: wrapped to the figure's width (model ids make long titles).
        marks: {(layer, head): label} cells to outline, e.g. the suppression heads with the
            smallest threshold that selects them.
        value_label: the colour bar's label.
    """
    matrix = np.asarray(matrix, float)  # [n_layers, n_heads]
    if matrix.ndim != 2:
        raise ValueError(f"plot_heads needs a 2-D [layers, heads] array, got shape {matrix.shape}")
    n_layers, n_heads = matrix.shape
    figure, (ax,) = _figure(min(max(4.5, 3 + 0.35 * n_heads), 12), min(max(3.2, 2.5 + 0.22 * n_layers), 11))
    ax.grid(False)
    limit = float(np.nanmax(np.abs(matrix))) if np.isfinite(matrix).any() else 1.0
    limit = max(limit, 1e-12)
    image = ax.imshow(
        matrix,
        cmap="RdBu_r",
        norm=TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit),
        aspect="auto",
        origin="lower",
        interpolation="nearest",
    )
    _mark_heads(ax, marks or {})
    # the title is centred over the heatmap, which leaves room for the colour bar and the labels
    ax.set(
        xlabel="head",
        ylabel="layer",
        title=_title(figure, title or "Head contributions to the refusal score", share=0.6),
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    figure.colorbar(image, ax=ax, label=textwrap.fill(value_label, 40))
    return figure


def plot_ablation(rows: Sequence[Mapping[str, Any]], title: str | None = None) -> Figure:
    """Figure 8: final refusal score, ASR and benign refusal rate vs the ablation threshold.

    Args:
        rows: ablation.json records [{threshold (fraction of all heads), final_score_mean, asr,
            benign_refusal_rate, gamma, renormalize, control, seed, boost_others}]; one line per
            (gamma, renormalize) setting of the ranked heads (`control` "ranked", or absent, and the
            unablated baseline "none"). The random control (`control` "random") is drawn as a gray
            band (min to max over seeds) around its dashed mean, starting from the baseline; the
            boosting control (`control` "boost") as a dotted line per factor.
        title: optional figure title.
    """
    figure, axes = _figure(11, 3.4, ncols=3)
    settings: dict[tuple, list] = {}
    random_rows: list = []
    boost_rows: dict[Any, list] = {}
    baseline = [
        r
        for r in rows
        if r.get("control") == "none"
        or (r.get("control") is None and not r.get("heads") and r.get("threshold") == 0)
    ]
    for row in rows:
        control = row.get("control")
        if control == "random":
            random_rows.append(row)
        elif control == "boost":
            boost_rows.setdefault(row.get("boost_others"), []).append(row)
        else:
            settings.setdefault((row.get("gamma"), bool(row.get("renormalize"))), []).append(row)
    panels = (
        ("final_score_mean", "Final refusal score (higher: safer)"),
        ("asr", "ASR (lower: safer)"),
        ("benign_refusal_rate", "Benign refusal rate"),
    )
    n_seeds = len({r.get("seed") for r in random_rows})
    for ax, (key, panel_title) in zip(axes, panels):
        for (gamma, renormalize), group in settings.items():
            points = sorted((100 * r["threshold"], r[key]) for r in group if r.get(key) is not None)
            if not points:
                continue
            label = "top heads, γ=" + ("?" if gamma is None else f"{gamma:g}")
            label += ", renormalised" if renormalize else ""
            ax.plot(*zip(*points), marker="o", label=label)
        if random_rows:
            by_threshold: dict[float, list[float]] = {}
            for row in baseline + random_rows:
                if row.get(key) is not None:
                    by_threshold.setdefault(100 * row["threshold"], []).append(row[key])
            if by_threshold:
                xs = sorted(by_threshold)
                values = [np.asarray(by_threshold[x], float) for x in xs]
                ax.fill_between(
                    xs, [v.min() for v in values], [v.max() for v in values], color="gray", alpha=0.25, lw=0
                )
                ax.plot(
                    xs,
                    [v.mean() for v in values],
                    color="gray",
                    ls="--",
                    marker=".",
                    label=f"random heads, mean and range ({n_seeds} seeds)",
                )
        for factor, group in boost_rows.items():
            points = sorted(
                (100 * r["threshold"], r[key]) for r in baseline + group if r.get(key) is not None
            )
            if points:
                ax.plot(*zip(*points), ls=":", marker="^", label=f"top heads + others ×{factor:g}")
        ax.set(xlabel="ablated heads (% of all heads)", title=panel_title, ylim=(-0.02, 1.02))
        if len(settings) > 1 or random_rows or boost_rows:
            _legend(ax, fontsize="small")
    if title:
        figure.suptitle(_title(figure, title))
    return figure


def _region_starts(regions: Sequence[str]) -> list[tuple[int, str]]:
    """(position, region) where each run of one region starts."""
    return [(i, region) for i, region in enumerate(regions) if i == 0 or regions[i - 1] != region]


REGION_COLORS = {"prompt": "tab:blue", "thinking": "tab:green", "end_template": END_TEMPLATE_COLOR}


def plot_head_patterns(mass: Sequence[Mapping[str, Any]], heatmap: Mapping[str, Any] | None = None) -> Figure:
    """Where the top suppression heads look from t_cliff.

    Args:
        mass: patterns.json `mass_mean` rows {layer, head, prompt, thinking, end_template}: each
            head's attention mass per region of the probing sequence, averaged over examples (left,
            stacked bars; the strongest suppression head at the top).
        heatmap: patterns.json `heatmap` {id, tokens, regions, weights: [[...] per head]}: one
            example's weights over its tokens (right; region starts marked under the axis).
    """
    figure, axes = _figure(
        12 if heatmap else 5.5, max(2.6, 1.2 + 0.35 * len(mass)), ncols=2 if heatmap else 1
    )
    ax = axes[0]
    names = [f"L{row['layer']}.H{row['head']}" for row in mass]
    left = np.zeros(len(mass))
    for region in ("prompt", "thinking", "end_template"):
        values = np.array([float(row.get(region) or 0.0) for row in mass])
        ax.barh(
            range(len(mass)), values, left=left, color=REGION_COLORS[region], label=region.replace("_", " ")
        )
        left += values
    ax.set_yticks(range(len(mass)), [plain_label(n) for n in names])
    ax.invert_yaxis()
    ax.set(
        xlim=(0, 1),
        xlabel="attention mass from t_cliff (mean over examples)",
        title="Attention mass per region",
    )
    ax.legend(frameon=False, fontsize="small", loc="lower right")
    if heatmap:
        hax = axes[1]
        hax.grid(False)
        weights = np.asarray(heatmap["weights"], float)  # [heads, tokens]
        image = hax.imshow(weights, aspect="auto", cmap="viridis", interpolation="nearest")
        hax.set_yticks(range(len(names)), [plain_label(n) for n in names])
        starts = _region_starts(list(heatmap["regions"]))
        for position, _ in starts[1:]:
            hax.axvline(position - 0.5, color="white", lw=0.8)
        hax.set_xticks(
            [p for p, _ in starts], [plain_label(r.replace("_", " ")) for _, r in starts], fontsize="small"
        )
        hax.set(
            xlabel="source token", title=_title(figure, f"Weights from t_cliff, example {heatmap['id']}", 0.5)
        )
        figure.colorbar(image, ax=hax, label="attention weight")
    return figure


def plot_direction(
    prober_curves: Mapping[str, Mapping[str, Any]] | None,
    direction_curves: Mapping[str, Mapping[str, Any]] | None,
    cosines: Mapping[str, float | None],
    prober_layer: int | None = None,
) -> Figure:
    """The difference-in-means direction beside the prober.

    Args:
        prober_curves, direction_curves: curves.json and direction_curves.json of one trace run
            (left: per group, the prober's mean score, solid, on the left axis; the direction's
            standardised projection, dashed, on the right axis). None: the left panel is left out.
        cosines: {layer: cosine between the layer's direction and the prober's weight} (right).
        prober_layer: the prober's layer, marked.
    """
    both = bool(prober_curves and direction_curves)
    figure, axes = _figure(12 if both else 5.5, 3.8, ncols=2 if both else 1)
    if both:
        ax = axes[0]
        twin = ax.twinx()
        starts = [
            c.get("end_template_start")
            for c in prober_curves.values()
            if c.get("end_template_start") is not None
        ]
        _shade_end_template(ax, min(starts) if starts else None)
        colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
        for index, group in enumerate(g for g in prober_curves if g in direction_curves):
            color = colors[index % len(colors)]
            ax.plot(
                prober_curves[group]["x"],
                prober_curves[group]["mean"],
                color=color,
                lw=2,
                label=plain_label(f"{group}: prober"),
            )
            twin.plot(
                direction_curves[group]["x"],
                direction_curves[group]["mean"],
                color=color,
                lw=1.5,
                ls="--",
                label=plain_label(f"{group}: difference in means"),
            )
        ax.set(
            xlabel="normalised position",
            ylabel="prober refusal score (solid)",
            xlim=(0, 100),
            ylim=(-0.02, 1.02),
            title="Prober vs difference-in-means direction",
        )
        twin.set_ylabel("standardised projection (dashed)")
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], frameon=False, fontsize="x-small", loc="best")
    ax = axes[-1]
    layers = sorted(cosines, key=lambda name: int(name))
    values = [np.nan if cosines[name] is None else float(cosines[name]) for name in layers]
    colors = [
        "tab:red" if prober_layer is not None and int(name) == prober_layer else "tab:gray" for name in layers
    ]
    ax.bar(range(len(layers)), values, color=colors)
    ax.set_xticks(range(len(layers)), layers)
    ax.axhline(0, color="black", lw=0.8)
    ax.set(
        xlabel="layer (red: the prober's)",
        ylabel="cosine(direction, prober weight)",
        ylim=(-1.02, 1.02),
        title="Cosine to the prober's weight",
    )
    return figure


# -- fine-tuning and selection -------------------------------------------------------------


def plot_asr_vs_k(
    asr_vs_k: Mapping[str, Sequence[Mapping[str, Any]]], baseline_asr: float | None = None
) -> Figure:
    """Figure 7: ASR vs number of training examples, one line per selection method.

    Args:
        asr_vs_k: evaluation.json's `asr_vs_k`, {method: [{"k": int, "asr": float}, ...]}.
        baseline_asr: ASR of the model before fine-tuning (gray dashed line), if known.
    """
    figure, (ax,) = _figure(6.5, 3.8)
    all_k = [p["k"] for points in asr_vs_k.values() for p in points if p["k"] > 0]
    for method, points in asr_vs_k.items():
        _series(ax, sorted(points, key=lambda p: p["k"]), "k", "asr", plain_label(method), "o")
    if baseline_asr is not None:
        ax.axhline(baseline_asr, color="gray", ls="--", label="before fine-tuning")
    if all_k and max(all_k) / min(all_k) >= 20:
        ax.set_xscale("log")
    ax.set(xlabel="training examples", ylabel="ASR", ylim=(-0.02, 1.02), title="ASR vs training examples")
    _legend(ax, fontsize="small")
    return figure


def plot_ms_histogram(
    ms_all: Sequence[float], ms_selected: Sequence[float], method: str | None = None
) -> Figure:
    """Cliff-as-a-Judge: misalignment scores of all candidates, the selected ones overlaid.

    The selected candidates are drawn as a second histogram on the same bins and as rug marks
    under the axis, so a selection of a few examples out of thousands is still visible.

    Args:
        ms_all: MS of every candidate that has one (candidates without thinking have none).
        ms_selected: MS of the selected candidates.
        method: the selection method (for the legend).
    """
    figure, (ax,) = _figure(7, 3.6)
    values = np.asarray([v for v in ms_all if v is not None and math.isfinite(v)], float)  # [n_candidates]
    chosen = np.asarray([v for v in ms_selected if v is not None and math.isfinite(v)], float)  # [n_selected]
    low, high = (float(values.min()), float(values.max())) if values.size else (-1.0, 1.0)
    bins = np.linspace(low, high if high > low else low + 1e-6, 31)
    ax.hist(
        values, bins=bins, color="tab:gray", alpha=0.6, label=f"all candidates with an MS (n={values.size})"
    )
    selected_label = plain_label(f"selected by {method}" if method else "selected") + f" (n={chosen.size})"
    ax.hist(chosen, bins=bins, color="tab:red", alpha=0.8, label=selected_label)
    ax.plot(
        chosen, np.zeros_like(chosen), "|", color="tab:red", markersize=14, transform=ax.get_xaxis_transform()
    )
    ax.set(
        xlabel="misalignment score MS = I − I'", ylabel="candidates", title="Misalignment score of candidates"
    )
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(frameon=False, fontsize="small")
    return figure


# -- components (issue 12) -------------------------------------------------------------------

COMPONENT_COLORS = {
    "attention": "tab:blue",
    "attention bias": "tab:cyan",
    "MLP": "tab:orange",
    "embeddings": "tab:gray",
}


def _components_by_layer(ax, summary: Mapping[str, Any]) -> None:
    """Stacked bars: per layer, the change across the end template carried by its heads, its
    o_proj bias and its MLP (the embeddings as a bar of their own left of layer 0)."""
    rows = summary["by_layer"]
    layers = np.asarray([row["layer"] for row in rows])
    parts = {
        "attention": np.asarray([row["attention_change"] for row in rows], float),
        "attention bias": np.asarray([row["attention_bias_change"] for row in rows], float),
        "MLP": np.asarray([row["mlp_change"] for row in rows], float),
    }
    positive, negative = np.zeros(len(rows)), np.zeros(len(rows))
    for name, values in parts.items():
        if not np.any(values):
            continue
        base = np.where(values >= 0, positive, negative)
        ax.bar(layers, values, bottom=base, color=COMPONENT_COLORS[name], label=name)
        positive += np.clip(values, 0, None)
        negative += np.clip(values, None, 0)
    embedding = summary["by_class"]["embeddings"]["change_mean"]
    ax.bar([-1.5], [embedding], color=COMPONENT_COLORS["embeddings"], label="embeddings")
    ax.axhline(0, color="black", lw=0.6)
    ax.set(
        xlabel="layer (embeddings at left)",
        ylabel="change of the logit term across the end template",
        title=f"Drop by layer and class (total {summary['logit']['change_mean']:+.2f})",
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(frameon=False, fontsize="small")


def _top_components(ax, components: Sequence[Mapping[str, Any]], top: int) -> None:
    """Horizontal bars of the `top` components with the largest |change|, mean ± std."""
    chosen = sorted(components, key=lambda c: -abs(c["change_mean"]))[:top]
    chosen = sorted(chosen, key=lambda c: c["change_mean"])
    y = np.arange(len(chosen))
    ax.barh(
        y,
        [c["change_mean"] for c in chosen],
        xerr=[c["change_std"] for c in chosen],
        color=[COMPONENT_COLORS[c["component_class"]] for c in chosen],
        error_kw={"lw": 0.6, "alpha": 0.5},
    )
    ax.set_yticks(y, [plain_label(c["name"]) for c in chosen], fontsize="small")
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.6)
    ax.set(xlabel="change across the end template (mean ± std)", title=f"Top {len(chosen)} components")


def _components_per_token(
    figure: Figure, ax, summary: Mapping[str, Any], chosen: Sequence[Mapping[str, Any]]
) -> None:
    """Heat map: each chosen component's step at each end-template token (term there minus the
    term at the token before)."""
    matrix = np.asarray([c["per_token_mean"] for c in chosen], float)  # [top, n_end]
    labels = [plain_label(t) for t in summary.get("position_labels", [])[1:]] or [
        str(i) for i in range(matrix.shape[1])
    ]
    limit = max(float(np.nanmax(np.abs(matrix))) if matrix.size else 1.0, 1e-12)
    ax.grid(False)
    image = ax.imshow(
        matrix,
        cmap="RdBu_r",
        norm=TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit),
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_yticks(range(len(chosen)), [plain_label(c["name"]) for c in chosen], fontsize="small")
    ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize="small")
    ax.set(xlabel="end-template token", title="Where each pushes (step per token)")
    figure.colorbar(image, ax=ax, label="step of the term (blue: towards compliance)")


def plot_components(summary: Mapping[str, Any], top: int = 20, title: str | None = None) -> Figure:
    """What makes the cliff (issue 12), from a components.json: three panels.

    1. Stacked bars per layer: the change of the prober logit across the thinking-end template
       carried by attention (heads), o_proj biases and the MLP; the embeddings left of layer 0.
    2. The `top` components by |change| (mean ± std over the group).
    3. A heat map of the top `top // 2` components' steps at each end-template token.
    """
    figure, axes = _figure(17, max(4.5, 0.22 * top + 1.5), ncols=3)
    _components_by_layer(axes[0], summary)
    _top_components(axes[1], summary["components"], top)
    strongest = sorted(summary["components"], key=lambda c: -abs(c["change_mean"]))[: max(1, top // 2)]
    _components_per_token(figure, axes[2], summary, strongest)
    if title:
        figure.suptitle(_title(figure, title))
    return figure


# -- cliff guard ---------------------------------------------------------------------------


def plot_guard(
    rows: Sequence[Mapping[str, Any]],
    ablation: Sequence[Mapping[str, Any]] | None = None,
    models: Sequence[Mapping[str, Any]] | None = None,
) -> Figure:
    """The cliff guard's trade-off: ASR against benign refusal rate as tau varies, next to the global
    head ablation (ablation.json) and fine-tuned models (evaluation.json), where given.

    Args:
        rows: guard.json records [{tau (None: unguarded), asr, benign_refusal_rate, action}].
        ablation: ablation.json records [{threshold, asr, benign_refusal_rate}].
        models: evaluation.json models [{model, asr, over_refusal}].
    """
    figure, (ax,) = _figure(6.5, 4.2)
    points = [r for r in rows if r.get("asr") is not None and r.get("benign_refusal_rate") is not None]
    if points:
        action = next((r.get("action") for r in points if r.get("action")), None)
        xs, ys = [r["benign_refusal_rate"] for r in points], [r["asr"] for r in points]
        ax.plot(xs, ys, marker="o", label=plain_label(f"cliff guard ({action})" if action else "cliff guard"))
        for row, x, y in zip(points, xs, ys):
            text = "unguarded" if row.get("tau") is None else f"τ={row['tau']:g}"
            ax.annotate(
                plain_label(text), (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small"
            )
    global_points = [
        r for r in (ablation or []) if r.get("asr") is not None and r.get("benign_refusal_rate") is not None
    ]
    if global_points:
        global_points = sorted(global_points, key=lambda r: r["threshold"])
        xs = [r["benign_refusal_rate"] for r in global_points]
        ys = [r["asr"] for r in global_points]
        ax.plot(xs, ys, marker="s", ls="--", label="global head ablation")
        for row, x, y in zip(global_points, xs, ys):
            ax.annotate(
                f"{100 * row['threshold']:g}%",
                (x, y),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize="x-small",
            )
    for model in models or []:
        if model.get("asr") is not None and model.get("over_refusal") is not None:
            ax.plot(
                [model["over_refusal"]],
                [model["asr"]],
                marker="^",
                ls="none",
                label=plain_label(model.get("model") or "fine-tuned"),
            )
    ax.set(
        xlabel="benign refusal rate (lower: fewer over-refusals)",
        ylabel="ASR (lower: safer)",
        xlim=(-0.02, 1.02),
        ylim=(-0.02, 1.02),
        title="Cliff guard: ASR vs benign refusal",
    )
    _legend(ax, fontsize="small")
    return figure

"""Tests for plotting.py: every figure takes plain data and returns a Figure; the heads heatmap is
centred at 0, runs layer 0 at the bottom and keeps a long title inside the figure."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from refusal_cliff.report import plotting

MATHTEXT = r"$\undefinedcommand$"  # would crash matplotlib's mathtext parser if not escaped


def test_plot_functions_take_plain_data():
    figures = [
        plotting.plot_prober_history([{"epoch": 1, "train_loss": 0.5, "val_accuracy": 0.9}]),
        plotting.plot_traces({"harmful": {"x": [0, 50, 100], "mean": [0.1, 0.9, 0.2]}}, title=MATHTEXT),
        plotting.plot_layerwise(
            {str(i): [0.1, 0.5, 0.1 * i] for i in range(12)}, {str(i): 0.1 * i for i in range(12)}
        ),
        plotting.plot_plateau_vs_harmless({"harmful": 0.8}, {"harmful": 0.2}, 0.1),
        plotting.plot_clipping([{"fraction": 0.5, "refusal_rate": 0.4}, {"fraction": 0.0, "ms_mean": 0.6}]),
        plotting.plot_ablation([{"threshold": 0.01, "asr": 0.2, "gamma": 0.0}], title=MATHTEXT),
        plotting.plot_asr_vs_k(
            {"cliff": [{"k": 100, "asr": 0.2}, {"k": 700, "asr": 0.02}]}, baseline_asr=0.4
        ),
        plotting.plot_ms_histogram([0.1, 0.2, None, 0.9, 0.8], [0.9, 0.8], method=MATHTEXT),
        plotting.plot_ms_histogram([], []),  # nothing scored yet: still a figure
    ]
    matrix = np.array([[0.5, -2.0], [np.nan, 1.0]])  # [n_layers, n_heads]
    heads_figure = plotting.plot_heads(matrix)
    figures.append(heads_figure)
    assert all(isinstance(f, Figure) for f in figures)
    for figure in figures:
        assert plotting.figure_png(figure)[:4] == b"\x89PNG"  # draws (mathtext escaped)
    image = heads_figure.axes[0].images[0]
    assert image.norm.vcenter == 0 and image.norm.vmin == -2.0 and image.norm.vmax == 2.0  # centred at 0
    assert image.get_cmap().name == "RdBu_r"  # red positive, blue negative

    rows = [{"layer": 1, "head": 0, "value": -0.3}, {"layer": 0, "head": 2, "value": 0.1}]
    grid = plotting.heads_matrix(rows)
    assert grid.shape == (2, 3) and grid[1, 0] == -0.3 and np.isnan(grid[0, 0])


def test_heads_figure_orientation_marks_and_title(tmp_path):
    matrix = np.arange(12.0).reshape(3, 4) - 6  # [n_layers, n_heads]
    title = "org/a-very-long-model-name-that-would-not-fit: head contributions at t_cliff (harmful-complied, n=64)"
    figure = plotting.plot_heads(matrix, title=title, marks={(2, 1): "0.01", (0, 3): "0.1"})
    ax = figure.axes[0]
    assert ax.images[0].origin == "lower"  # layer 0 at the bottom, as in the report
    assert [t.get_text() for t in ax.texts] == ["0.01", "0.1"] and len(ax.patches) == 2
    assert "\n" in ax.get_title()  # wrapped to the figure's width
    path = plotting.save_figure(figure, tmp_path / "sub" / "heads.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    renderer = figure.canvas.get_renderer()
    box = ax.title.get_window_extent(renderer)
    assert box.x0 >= 0 and box.x1 <= figure.bbox.width and box.y1 <= figure.bbox.height  # not cut off

"""Tests for the report package: every section renders from hand-made artifacts, model text is
escaped, summary.json holds the numbers, missing artifacts skip sections, malformed ones are
UserErrors, an unreliable prober raises a warning. The figures themselves: tests/test_plotting.py."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from refusal_cliff import report as rep
from refusal_cliff.cli.report import report as report_command
from refusal_cliff.core.errors import UserError

XSS = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(2)>"
MATHTEXT = r"$\undefinedcommand$"  # would crash matplotlib's mathtext parser if not escaped


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _curve(shape: np.ndarray, n: int) -> dict:
    return {
        "x": np.linspace(0, 100, 101).tolist(),
        "mean": shape.tolist(),
        "std": (0.05 + 0 * shape).tolist(),
        "n": n,
        "end_template_start": 95.0,
    }


def _write_traces(path: Path) -> None:
    """traces.parquet as `trace` writes it (a folder of parts): the harmful examples 0, 1, 2, each a prompt,
    a thinking whose score stays high and an end template where it falls; example 0 has a hostile token."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"id": [], "position": [], "token_id": [], "token": [], "region": [], "score": []}
    for example in ("0", "1", "2"):
        tokens = [("User", "prompt", 0.2)] + [(f" step{i}", "thinking", 0.9) for i in range(60)]
        tokens += [
            (XSS if example == "0" else " done", "thinking", 0.85),
            ("\n</think>", "end_template", 0.4),
        ]
        tokens += [("\n\n", "end_template", 0.05)]
        for position, (token, region, score) in enumerate(tokens):
            for key, value in zip(rows, (example, position, position, token, region, score)):
                rows[key].append(value)
    path.mkdir(parents=True)
    pq.write_table(pa.table(rows), path / "part-00000.parquet")


def _make_run(root: Path) -> Path:
    """A demo-like run folder with every artifact, hostile text in prompts, answers and names."""
    x = np.linspace(0, 1, 101)
    cliff_shape = np.clip(0.2 + 0.7 * x, 0, 0.85)
    cliff_shape[96:] = np.linspace(0.8, 0.1, 5)
    _write_json(
        root / "demo.json",
        {"system_prompt": f"Be safe {XSS}", "refusal_rate": 0.25, f"note {IMG}": {"nested": [1, 2]}},
    )
    _write_json(
        root / "metadata.json",
        {
            "stage": "demo",
            "model_id": "org/tiny-reasoner",
            "model_revision": "abc123",
            "started": "2025-01-02T03:04:05+00:00",
        },
    )
    # Prompt ids are row indices: harmful and harmless generation runs share ids.
    _write_jsonl(
        root / "generate_harmful" / "generations.jsonl",
        [
            {
                "id": "0",
                "prompt": f"HARMFUL PROMPT 0 {XSS}",
                "thinking": "plan " * 1000 + "THE END OF THINKING",
                "end_template": "\n</think>\n\n",
                "answer": f"Sure, here is how {IMG}",
            },
            {
                "id": "1",
                "prompt": "HARMFUL PROMPT 1",
                "thinking": "short thought",
                "answer": "I can't help with that.",
            },
            {"id": "2", "prompt": f"HARMFUL PROMPT 2 {IMG}", "thinking": XSS, "answer": ""},
        ],
    )
    _write_jsonl(
        root / "generate_harmful" / "labels.jsonl",
        [
            {"id": "0", "refusal": False, "judge": "keyword", "matched": None},
            {"id": "1", "refusal": True, "judge": "keyword", "matched": "I can't"},
            {"id": "2", "refusal": False, "judge": "keyword", "matched": None},
        ],
    )
    _write_jsonl(
        root / "generate_harmless" / "generations.jsonl",
        [
            {"id": "0", "prompt": "HARMLESS PROMPT 0", "thinking": "t", "answer": "a"},
            {"id": "1", "prompt": "HARMLESS PROMPT 1", "thinking": "t", "answer": "a"},
        ],
    )
    _write_json(
        root / "probe" / "prober.json",
        {
            "model_id": "org/tiny-reasoner",
            "model_revision": "abc123",
            "architecture": "LlamaForCausalLM",
            "layer": 2,
            "n_layers": 3,
            "d_model": 64,
            "final_norm_applied": True,
            "end_template": "\n</think>\n\n",
            "metrics": {
                "val_accuracy": 0.97,
                "ood_accuracy": 0.91,
                "best_epoch": 4,
                "n_train": 200,
                "n_val": 50,
            },
            "history": [
                {
                    "epoch": e,
                    "train_loss": 0.7 / e,
                    "val_loss": 0.75 / e,
                    "val_accuracy": 0.8 + 0.03 * e,
                    "ood_accuracy": None if e == 1 else 0.7 + 0.04 * e,
                }
                for e in range(1, 6)
            ],
            "config": {"lr": 1e-3},
        },
    )
    _write_json(
        root / "trace" / "curves.json",
        {
            "harmful": _curve(cliff_shape, 3),
            "harmless": _curve(0.1 + 0.05 * x, 2),
            f"odd {MATHTEXT} {XSS}": _curve(0.5 + 0 * x, 1),
        },
    )
    _write_jsonl(
        root / "trace" / "cliff.jsonl",
        [
            {
                "id": "0",
                "plateau": 0.9,
                "final": 0.05,
                "ms": 0.85,
                "t_cliff": 120,
                "drop": 0.4,
                "group": "harmful",
            },
            {
                "id": "1",
                "plateau": 0.8,
                "final": 0.7,
                "ms": 0.1,
                "t_cliff": 40,
                "drop": 0.05,
                "group": "harmful",
            },
            {"id": "2", "plateau": 0.7, "final": 0.2, "t_cliff": 77, "group": "harmful"},  # ms derived: 0.5
            {
                "id": "0",
                "plateau": 0.15,
                "final": 0.1,
                "ms": 0.05,
                "t_cliff": 30,
                "drop": 0.01,
                "group": "harmless",
            },
            {
                "id": "1",
                "plateau": 0.12,
                "final": 0.1,
                "ms": 0.02,
                "t_cliff": 31,
                "drop": 0.01,
                "group": "harmless",
            },
        ],
    )
    _write_traces(root / "trace" / "traces.parquet")
    _write_json(
        root / "trace" / "layerwise.json",
        {
            str(layer): {
                "harmful": {"mean": (cliff_shape * (layer + 1) / 3).tolist(), "ms_mean": 0.3 * (layer + 1)},
                "harmless": {"mean": (0.1 + 0 * x).tolist()},
                "ms_mean": 0.2 * (layer + 1),
            }
            for layer in (0, 1, 2)
        },
    )
    _write_json(
        root / "trace" / "clipping.json",
        [
            {
                "fraction": f,
                "final_mean": 0.1 + 0.5 * f,
                "ms_mean": 0.7 - 0.5 * f,
                "drop_mean": 0.3 - 0.2 * f,
                "refusal_rate": 0.2 + 0.6 * f,
                "n": 3,
            }
            for f in (0.0, 0.5, 1.0)
        ],
    )
    heads = [
        {
            "layer": layer,
            "head": head,
            "contribution": float(np.sin(3 * layer + head)),
            "contribution_exact": float(np.sin(3 * layer + head)) + 0.01,
            "std": 0.1,
        }
        for layer in range(3)
        for head in range(4)
    ]
    heads.sort(key=lambda h: h["contribution"])
    for rank, head in enumerate(heads):
        head["rank"] = rank
    _write_json(root / "heads" / "heads.json", heads)
    _write_json(root / "components" / "components.json", _components_summary())
    _write_json(
        root / "direction" / "directions.json",
        {
            "model_id": "org/tiny-reasoner",
            "prober_layer": 2,
            "n_refused": 20,
            "n_complied": 18,
            "layers": {
                str(layer): {
                    "norm": 1.0 + layer,
                    "cosine_to_prober": 0.1 * layer,
                    "projection_mean": 0.0,
                    "projection_std": 1.0,
                    "refused_mean": 1.2,
                    "complied_mean": -1.1,
                    "accuracy": 0.9,
                }
                for layer in (0, 1, 2)
            },
        },
    )
    _write_json(
        root / "trace" / "direction_curves.json",
        {"harmful": _curve(cliff_shape, 3), "harmless": _curve(0.1 + 0.05 * x, 2)},
    )
    tokens = ["How", f" {XSS}", "<think>", " plan", "\n</think>\n\n"]
    regions = ["prompt", "prompt", "thinking", "thinking", "end_template"]
    _write_json(
        root / "heads" / "patterns.json",
        {
            "heads": [[2, 1], [1, 3]],
            "top": 20,
            "mass_mean": [
                {
                    "layer": 2,
                    "head": 1,
                    "rank": 0,
                    "contribution": -0.8,
                    "prompt": 0.5,
                    "thinking": 0.2,
                    "end_template": 0.3,
                },
                {
                    "layer": 1,
                    "head": 3,
                    "rank": 1,
                    "contribution": -0.5,
                    "prompt": 0.1,
                    "thinking": 0.1,
                    "end_template": 0.8,
                },
            ],
            "examples": [],
            "heatmap": {
                "id": "0",
                "tokens": tokens,
                "regions": regions,
                "weights": [[0.1, 0.2, 0.3, 0.2, 0.2], [0.0, 0.1, 0.1, 0.3, 0.5]],
            },
        },
    )
    _write_json(
        root / "components_ablate" / "component_ablation.json",
        [
            {
                "condition": name,
                "components": specs,
                "gamma": 0.0,
                "final_score_mean": 0.4,
                "asr": asr,
                "benign_refusal_rate": None,
                "n_harmful": 6,
                "n_benign": 0,
            }
            for name, specs, asr in (("unablated", [], 0.2), ("top 2 MLPs", ["mlp:2", "mlp:1"], 0.5))
        ],
    )
    _write_json(
        root / "ablate" / "ablation.json",
        [
            {
                "threshold": t,
                "heads": [[2, 1]] * int(100 * t),
                "gamma": 0.0,
                "renormalize": False,
                "final_score_mean": 0.1 + 3 * t,
                "asr": 0.6 - 5 * t,
                "benign_refusal_rate": 0.05 + t,
                "n_harmful": 20,
                "n_benign": 10,
            }
            for t in (0.0, 0.01, 0.03, 0.1)
        ],
    )
    _write_json(
        root / "guard" / "guard.json",
        [
            {
                "tau": tau,
                "rule": "ms",
                "action": "ablate",
                "asr": asr,
                "benign_refusal_rate": benign,
                "flag_rate_harmful": flagged,
                "flag_rate_benign": flagged / 2,
                "n": 30,
                "n_harmful": 20,
                "n_benign": 10,
            }
            for tau, asr, benign, flagged in (
                (None, 0.6, 0.05, 0.0),
                (0.1, 0.3, 0.1, 0.8),
                (0.3, 0.45, 0.05, 0.4),
            )
        ],
    )
    _write_json(
        root / "repair" / "evaluation.json",
        {
            "models": [
                {
                    "model": "org/tiny-reasoner",
                    "asr": 0.38,
                    "over_refusal": 0.02,
                    "final_score_mean": 0.1,
                    "tasks": {
                        "arc_challenge": {"accuracy": 0.5},
                        f"task {XSS}": {"accuracy": 0.4, "stderr": 0.01},
                    },
                },
                {
                    "model": f"cliff-k700 {IMG}",
                    "method": "cliff",
                    "k": 700,
                    "asr": 0.025,
                    "over_refusal": 0.04,
                    "final_score_mean": 0.8,
                    "tasks": {"arc_challenge": {"accuracy": 0.49}},
                },
            ],
            "asr_vs_k": {
                "cliff": [{"k": 700, "asr": 0.025, "model": "m2"}, {"k": 100, "asr": 0.2, "model": "m1"}],
                f"rule {XSS}": [{"k": 1000, "asr": 0.3}, {"k": 20000, "asr": 0.03}],
            },
        },
    )
    _make_selection(root / "repair" / "select")
    return root


def _make_selection(folder: Path) -> None:
    """What `select` writes: scores of 40 candidates (one without thinking), the top 4 by MS, metadata."""
    scores = [
        {
            "id": f"c{i}",
            "plateau": 0.9,
            "final": 0.9 - 0.02 * i,
            "ms": 0.02 * i,
            "t_cliff": 50,
            "drop": 0.1,
            "refusal": i % 2 == 0,
            "unsafe": None,
        }
        for i in range(40)
    ]
    scores.append(
        {
            "id": "c40",
            "plateau": None,
            "final": 0.4,
            "ms": None,
            "t_cliff": 3,
            "drop": None,
            "refusal": False,
            "unsafe": None,
        }
    )
    _write_jsonl(folder / "scores.jsonl", scores)
    selected = sorted(scores[:40], key=lambda r: -r["ms"])[:4]
    _write_jsonl(
        folder / "selection.jsonl",
        [
            {
                **row,
                "rank": rank,
                "method": "cliff",
                "prompt": f"CANDIDATE {row['id']} {XSS}",
                "response": f"safe reply {IMG}",
                "thinking": "hmm",
                "messages": [],
            }
            for rank, row in enumerate(selected)
        ],
    )
    _write_json(
        folder / "metadata.select.json",
        {
            "stage": "select",
            "method": "cliff",
            "k": 4,
            "resolved_k": 4,
            "n_candidates": 41,
            "n_selected": 4,
            "ms_mean_selected": 0.75,
            "ms_mean_all": 0.39,
        },
    )


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return _make_run(tmp_path / "run")


def _components_summary() -> dict:
    """A components.json from random terms (3 layers of 4 heads, 3 examples, 4 positions)."""
    import torch

    from refusal_cliff.stages.components import ComponentTerms, summarize

    generator = torch.Generator().manual_seed(0)
    terms = ComponentTerms(
        head=torch.randn(3, 4, 3, 4, generator=generator),
        o_proj_bias=torch.zeros(3, 4, 3),
        mlp=torch.randn(3, 4, 3, generator=generator),
        embedding=torch.randn(3, 4, generator=generator),
        logit=torch.zeros(3, 4),
        prober_bias=0.1,
        n_end=torch.tensor([3, 3, 3]),
    )
    terms.logit = terms.total()
    return {
        "model": "org/tiny-reasoner",
        "group": "harmful_complied",
        "final_norm_applied": False,
        "position_labels": ["(last thinking token)", "\\n", "</think>", "\\n\\n"],
        **summarize(terms, 2),
    }


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, Path]:
    """One full render shared by the read-only checks (rendering all figures takes seconds)."""
    run_dir = _make_run(tmp_path_factory.mktemp("report") / "run")
    return run_dir, rep.render_report(run_dir, top_examples=3)


def test_full_report_renders_every_section_escaped(rendered: tuple[Path, Path]):
    run_dir, path = rendered
    assert path == run_dir / "report.html"
    page = path.read_text(encoding="utf-8")

    # Hostile text is escaped everywhere and never appears raw; the page has no script at all.
    assert "<script" not in page.lower()
    assert "<img src=x" not in page
    assert html.escape(XSS) in page and html.escape(IMG) in page
    assert html.escape(f"HARMFUL PROMPT 0 {XSS}") in page
    assert html.escape(f"cliff-k700 {IMG}") in page  # evaluation model name
    assert html.escape(f"task {XSS}") in page  # task name
    assert html.escape(f"Be safe {XSS}") in page and html.escape(f"note {IMG}") in page  # run notes

    # Self-contained: no external resources.
    assert "http://" not in page and "https://" not in page and "<link" not in page

    # Every section is present, nothing skipped, every figure embedded and written.
    for key in (section.name for section in rep.SECTIONS):
        assert f'<section id="{key}">' in page, key
        assert f'href="#{key}"' in page
    assert "Skipped sections" not in page
    assert page.count("data:image/png;base64,") == len(rep.FIGURE_NAMES)
    for name in rep.FIGURE_NAMES:
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    # Examples: ids collide across harmful/harmless runs; the harmful group reads generate_harmful/.
    assert "HARMLESS PROMPT" not in page
    assert "THE END OF THINKING" in page  # the tail of a long thinking is kept...
    assert "plan " * 1000 not in page and "…" in page  # ...and the middle is cut with a marker
    # Header facts.
    assert "org/tiny-reasoner" in page and "abc123" in page and rep.__version__ in page

    # The token view: the thinking's tail and the end template, each token shaded, scored on hover,
    # the end template boxed; a token is model text, escaped like any other.
    tokens = page.split('<section id="tokens">', 1)[1].split("</section>", 1)[0]
    assert tokens.count('<div class="tokens">') == 3
    assert (
        'class="tok end" style="background:rgba(207,34,46,0.050)" title="0.050 · end_template · position 63"'
        in tokens
    )
    assert 'style="background:rgba(207,34,46,0.900)"' in tokens and " step59" in tokens
    assert " step0<" not in tokens  # only the last thinking tokens are shown, after a "…"
    assert html.escape(XSS) in tokens and "↵" in tokens


def test_summary_holds_the_numbers(rendered: tuple[Path, Path]):
    run_dir, _ = rendered
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["skipped"] == {}
    assert summary["sections"] == [section.name for section in rep.SECTIONS]
    assert summary["model_ids"] == ["org/tiny-reasoner"]
    assert summary["prober"]["metrics"]["val_accuracy"] == 0.97
    assert summary["prober"]["history"][0]["ood_accuracy"] is None
    assert summary["prober"]["history"][4]["val_accuracy"] == pytest.approx(0.95)

    cliff = summary["cliff"]
    assert cliff["harmful"]["n"] == 3
    assert cliff["harmful"]["ms_mean"] == pytest.approx((0.85 + 0.1 + 0.5) / 3)
    assert cliff["harmless"]["plateau_mean"] == pytest.approx(0.135)

    assert [e["id"] for e in summary["tokens"]] == ["0", "2", "1"]
    assert summary["tokens"][0]["n_tokens_shown"] == rep.sections.TOKEN_VIEW_THINKING + 2
    examples = summary["examples"]
    assert [e["id"] for e in examples] == ["0", "2", "1"]  # sorted by MS, derived ms for id 2
    assert examples[1]["ms"] == pytest.approx(0.5)
    assert [e["refusal"] for e in examples] == [False, False, True]
    assert all(e["group"] == "harmful" and e["text_found"] for e in examples)

    expected_harmless = float(np.mean(0.1 + 0.05 * np.linspace(0, 1, 101)))
    assert summary["plateau"]["harmless_score"] == pytest.approx(expected_harmless)
    assert summary["plateau"]["harmless_groups"] == ["harmless"]
    assert summary["plateau"]["groups"]["harmful"]["plateau_mean"] == pytest.approx(0.8)

    assert summary["layerwise"]["group"] == "harmful"
    layers = summary["layerwise"]["layers"].values()
    assert [v["ms_mean"] for v in layers] == pytest.approx([0.3, 0.6, 0.9])  # the shown group's own MS
    assert [v["ms_mean_all_groups"] for v in layers] == pytest.approx([0.2, 0.4, 0.6])
    assert [r["refusal_rate"] for r in summary["clipping"]] == pytest.approx([0.2, 0.5, 0.8])

    heads = summary["heads"]
    assert heads["shape"] == [3, 4]
    most_negative = min(np.sin(3 * layer + head) for layer in range(3) for head in range(4))
    assert heads["top_suppression_heads"][0]["contribution"] == pytest.approx(most_negative)
    assert heads["min"] == pytest.approx(most_negative)

    assert [r["threshold"] for r in summary["ablation"]] == [0.0, 0.01, 0.03, 0.1]
    assert summary["ablation"][2]["asr"] == pytest.approx(0.45)
    assert summary["ablation"][3]["n_heads"] == 10

    models = summary["evaluation"]["models"]
    assert models[0]["asr"] == 0.38 and models[1]["k"] == 700
    assert models[0]["tasks"][f"task {XSS}"] == 0.4  # {"accuracy": ...} as `evaluate` writes it
    assert summary["evaluation"]["asr_vs_k"]["cliff"] == [{"k": 100, "asr": 0.2}, {"k": 700, "asr": 0.025}]
    assert summary["notes"]["refusal_rate"] == 0.25
    assert summary["figures"]["fig_heads.png"] == "heads"


def test_a_folder_without_stage_artifacts_is_refused(tmp_path: Path):
    # Issue 21: a report over a folder with no stage artifact is refused (it was a page of skipped sections).
    (tmp_path / "notes.txt").write_text("not an artifact")
    with pytest.raises(UserError, match="holds no stage artifacts"):
        rep.render_report(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing written


def test_partial_run_skips_only_missing_sections(run_dir: Path):
    for name in (
        "ablate/ablation.json",
        "probe/prober.json",
        "heads/heads.json",
        "repair/evaluation.json",
        "trace/layerwise.json",
        "trace/clipping.json",
        "repair/select/scores.jsonl",
        "guard/guard.json",
    ):
        (run_dir / name).unlink()
    (run_dir / "fig_ablation.png").write_bytes(b"stale")
    rep.render_report(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["skipped"]) == {
        "ablation",
        "prober",
        "heads",
        "evaluation",
        "layerwise",
        "clipping",
        "selection",
        "guard",
    }
    assert "scores.jsonl" in summary["skipped"]["selection"]
    kept = [
        "notes",
        "traces",
        "cliff",
        "tokens",
        "examples",
        "plateau",
        "direction",
        "patterns",
        "components",
    ]
    assert summary["sections"] == [section.name for section in rep.SECTIONS if section.name in kept]
    assert not (run_dir / "fig_ablation.png").exists()  # a stale figure is not left behind


@pytest.mark.parametrize(
    "content, message",
    [
        (
            '{"id": "0", "plateau": 0.9, "final": 0.1}\nnot json\n{"id": "1", "plateau": 0.5, "final": 0.4}\n',
            "line 2",
        ),
        ('{"id": "0", "plateau": "high", "final": 0.1}\n', "plateau"),
        ('{"plateau": 0.9, "final": 0.1}\n', "missing 'id'"),
        ("[1, 2]\n", "must be an object"),
    ],
)
def test_malformed_cliff_jsonl_is_a_user_error(run_dir: Path, content: str, message: str):
    (run_dir / "trace" / "cliff.jsonl").write_text(content)
    with pytest.raises(UserError, match=message):
        rep.render_report(run_dir)


@pytest.mark.parametrize(
    "name, content",
    [
        ("heads/heads.json", '{"layer": 0}'),
        ("trace/curves.json", '{"harmful": {"mean": [0.1, "x"]}}'),
        ("probe/prober.json", "{not json"),
        ("repair/evaluation.json", '{"models": [{"model": "m", "asr": "low"}]}'),
    ],
)
def test_other_malformed_artifacts_are_user_errors(run_dir: Path, name: str, content: str):
    (run_dir / name).write_text(content)
    with pytest.raises(UserError):
        rep.render_report(run_dir)


def test_missing_folder_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError, match="not found"):
        rep.render_report(tmp_path / "nope")


def test_writer_formats_sorted(tmp_path: Path):
    """The formats the stages write (docs/artifacts.md), read in order: asr_vs_k by k, layers by number."""
    _write_json(
        tmp_path / "evaluation.json",
        {
            "models": [],
            "asr_vs_k": {
                "random": [{"k": 500, "asr": 0.3, "model": "r500"}, {"k": 100, "asr": 0.35, "model": "r100"}]
            },
        },
    )
    _write_json(
        tmp_path / "layerwise.json",
        {
            "layer_10": {"harmful": {"mean": [0.5, 0.6, 0.2], "ms_mean": 0.4}, "ms_mean": 0.4},
            "layer_2": {"harmful": {"mean": [0.4, 0.4, 0.3], "ms_mean": 0.1}, "ms_mean": None},
        },
    )
    _write_json(
        tmp_path / "curves.json", {"harmful": {"x": [0, 50, 100], "mean": [0.2, 0.8, 0.1], "std": None}}
    )
    rep.render_report(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["evaluation"]["asr_vs_k"]["random"] == [{"k": 100, "asr": 0.35}, {"k": 500, "asr": 0.3}]
    assert list(summary["layerwise"]["layers"]) == ["layer_2", "layer_10"]  # numeric order
    assert summary["traces"]["harmful"]["max"] == 0.8


@pytest.mark.parametrize(
    "name, content, message",
    [
        # Formats no stage writes are not guessed at: the field is named in the error.
        (
            "evaluation.json",
            {"models": [], "asr_vs_k": [{"method": "random", "k": 500, "asr": 0.3}]},
            "asr_vs_k",
        ),
        (
            "evaluation.json",
            {"models": [], "asr_vs_k": {"random": {"k": [1, 2], "asr": [0.3, 0.2]}}},
            "random",
        ),
        ("evaluation.json", {"models": [{"model": "m", "tasks": {"arc": 0.5}}]}, "tasks.arc"),
        ("layerwise.json", {"layer_2": {"harmful": [0.4, 0.4, 0.3]}}, "harmful"),
        ("curves.json", {"harmful": {"mean": [0.2, 0.8, 0.1]}}, "'x'"),
        ("selection.jsonl", [{"id": "c1", "rank": 0, "method": "cliff"}], "prompt"),
        ("scores.jsonl", [{"id": "c1", "ms": 0.3, "refusal": "no"}], "refusal"),
        ("metadata.select.json", {"method": "cliff", "n_candidates": 3}, "n_selected"),
    ],
)
def test_formats_outside_the_schema_are_user_errors(tmp_path: Path, name: str, content, message: str):
    if name.endswith(".jsonl"):
        _write_jsonl(tmp_path / name, content)
    else:
        _write_json(tmp_path / name, content)
    with pytest.raises(UserError, match=message):
        rep.render_report(tmp_path)


def _prober_json(**extra) -> dict:
    return {
        "model_id": "org/m",
        "layer": 1,
        "n_layers": 2,
        "d_model": 8,
        "final_norm_applied": False,
        "metrics": {"val_accuracy": 0.6, "best_epoch": 1, **extra.pop("metrics", {})},
        "history": [
            {"epoch": 1, "train_loss": 0.6, "val_loss": 0.7, "val_accuracy": 0.6, "ood_accuracy": None}
        ],
        **extra,
    }


def test_unreliable_prober_warning_comes_first(tmp_path: Path):
    _write_json(
        tmp_path / "probe" / "prober.json",
        _prober_json(
            quality="unreliable",
            quality_reasons=[f"only 12 validation examples {XSS}", "interval covers 0.5"],
            metrics={"val_accuracy_ci95": [0.35, 0.81], "majority_rate": 0.58},
        ),
    )
    # a layer-study prober two folders down is checked too
    _write_json(tmp_path / "layers" / "layer_0" / "prober.json", _prober_json(quality="reliable"))
    page = rep.render_report(tmp_path).read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())

    warning = page.index('class="warning"')
    assert warning < page.index('class="skipped"') and warning < page.index("<nav>")
    assert warning < page.index("<section")  # before any section
    box = page[warning : page.index("</div>", warning)]
    assert "Unreliable refusal prober" in box and "probe/prober.json" in box
    assert html.escape(f"only 12 validation examples {XSS}") in box and "interval covers 0.5" in box
    assert "[0.350, 0.810]" in box and "0.580" in box  # the 95% interval and the majority rate
    assert XSS not in page

    quality = {entry["source"]: entry for entry in summary["prober_quality"]}
    assert set(quality) == {"probe/prober.json", "layers/layer_0/prober.json"}
    assert quality["probe/prober.json"]["quality"] == "unreliable"
    assert quality["probe/prober.json"]["val_accuracy_ci95"] == [0.35, 0.81]
    assert quality["probe/prober.json"]["majority_rate"] == 0.58
    assert quality["layers/layer_0/prober.json"]["quality"] == "reliable"
    assert summary["prober"]["metrics"]["val_accuracy_ci95"] == [0.35, 0.81]


@pytest.mark.parametrize("extra", [{}, {"quality": "reliable", "quality_reasons": []}])
def test_no_warning_for_reliable_or_old_probers(tmp_path: Path, extra: dict):
    _write_json(tmp_path / "prober.json", _prober_json(**extra))
    page = rep.render_report(tmp_path).read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 'class="warning"' not in page and "Unreliable" not in page
    expected = [extra["quality"]] if extra else []  # an old prober states no quality
    assert [entry["quality"] for entry in summary["prober_quality"]] == expected


def test_prober_with_an_unknown_quality_is_a_user_error(tmp_path: Path):
    _write_json(tmp_path / "prober.json", _prober_json(quality="great"))
    with pytest.raises(UserError, match="quality"):
        rep.render_report(tmp_path)


def test_selection_section_from_a_select_folder(tmp_path: Path):
    """A hand-made run with only `repair/select/` (as the repair demo writes it)."""
    _make_selection(tmp_path / "run" / "repair" / "select")
    run_dir = tmp_path / "run"
    page = rep.render_report(run_dir).read_text()
    summary = json.loads((run_dir / "summary.json").read_text())

    assert summary["sections"] == ["selection"] and "selection" not in summary["skipped"]
    selection = summary["selection"]
    assert selection["method"] == "cliff" and selection["k"] == 4 and selection["resolved_k"] == 4
    assert selection["n_candidates"] == 41 and selection["n_selected"] == 4 and selection["n_without_ms"] == 1
    assert selection["ms_mean_selected"] == pytest.approx((0.78 + 0.76 + 0.74 + 0.72) / 4)
    assert selection["ms_mean_all"] == pytest.approx(0.02 * sum(range(40)) / 40)
    assert [r["id"] for r in selection["top_selected"]] == ["c39", "c38", "c37", "c36"]
    assert summary["figures"] == {"fig_selection.png": "selection"}
    assert (run_dir / "fig_selection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["sources"]["scores.jsonl"] == ["repair/select/scores.jsonl"]

    section = page[page.index('<section id="selection">') :]
    assert "Cliff-as-a-Judge" in page and "data:image/png;base64," in section
    assert html.escape(f"CANDIDATE c39 {XSS}") in section and XSS not in page  # prompts escaped
    assert "<img src=x" not in page


def test_selection_is_skipped_without_its_artifacts(tmp_path: Path):
    _make_selection(tmp_path / "select")
    (tmp_path / "select" / "metadata.select.json").unlink()
    page = rep.render_report(tmp_path).read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "metadata.select.json" in summary["skipped"]["selection"]
    assert "refusal-cliff select" in summary["skipped"]["selection"]
    assert "Cliff-as-a-Judge selection" in page[page.index("Skipped sections") :]
    assert not (tmp_path / "fig_selection.png").exists()


def test_truncate_text():
    assert rep.truncate_text("short", 10) == "short"
    assert rep.truncate_text("a" * 20, 10) == "a" * 10 + " …"
    cut = rep.truncate_text("HEAD" + "x" * 100 + "TAIL", 20, keep_tail=True)
    assert cut.startswith("HEAD") and cut.endswith("TAIL") and " … " in cut and len(cut) < 30


def test_cli_report(tmp_path: Path):
    run_dir = tmp_path / "run"  # figure-free artifacts keep this fast
    no_thinking = {"id": "9", "plateau": None, "final": 0.3, "ms": None, "group": None}  # trace writes nulls
    _write_jsonl(
        run_dir / "cliff.jsonl",
        [{"id": str(i), "plateau": 0.9, "final": 0.1 * i} for i in range(5)] + [no_thinking],
    )
    _write_jsonl(
        run_dir / "generations.jsonl", [{"id": str(i), "prompt": f"p{i}", "answer": XSS} for i in range(5)]
    )
    runner = CliRunner()
    result = runner.invoke(report_command, ["--run", str(run_dir), "--top", "2"])
    assert result.exit_code == 0, result.output
    assert str(run_dir / "report.html") in result.output
    examples = json.loads((run_dir / "summary.json").read_text())["examples"]
    assert [e["id"] for e in examples] == ["0", "1"] and examples[0]["group"] == "all"
    cliff = json.loads((run_dir / "summary.json").read_text())["cliff"]["all"]
    assert cliff["n"] == 6 and cliff["n_with_ms"] == 5 and cliff["final_mean"] == pytest.approx(1.3 / 6)
    assert XSS not in (run_dir / "report.html").read_text()

    result = runner.invoke(report_command, ["--run", str(tmp_path / "missing")])
    assert isinstance(result.exception, UserError)

"""The self-contained HTML report of a run folder, and its summary.json.

The other stages leave numbers in artifacts (docs/artifacts.md); this package turns whatever a
run folder holds into the paper's figures and tables, so that a run can be read without a
notebook. The package is split by what changes together:

- `artifacts.py`: where each artifact is, its schema and its checking loader. A *malformed*
  artifact is a `UserError` before anything is written: a wrong report is worse than none.
- `sections.py`: `SECTIONS`, one `Section(name, title, artifacts, render, figure)` entry per
  section, in report order. A missing artifact only skips its sections, listed at the top.
- `html.py`: escaping (all model and dataset text goes through `html.escape`), tables and the
  page; no external URLs, figures are base64 PNGs, each also written as `fig_*.png`.
- `quality.py`: the warning box shown first when a prober of the run is marked unreliable.
- The figures themselves are in `refusal_cliff.plotting`, shared with the stages.

Where to add things: a figure or a section is one `Section` entry plus its render function in
`sections.py` (and the plot in `plotting.py`); an artifact is a loader and an `Artifact` entry
in `artifacts.py`; an artifact field is its TypedDict and loader in `artifacts.py`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from refusal_cliff import __version__
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.runs import atomic_write_text, write_json
from refusal_cliff.report.artifacts import ARTIFACTS, RunArtifacts, load_run
from refusal_cliff.report.html import Html, page, truncate_text
from refusal_cliff.report.quality import prober_quality, quality_warning
from refusal_cliff.report.sections import (
    FIGURE_NAMES,
    SECTIONS,
    Context,
    Section,
    Skip,
    is_harmless_group,
    missing_reason,
)

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
SUMMARY_NAME = "summary.json"

__all__ = [
    "FIGURE_NAMES",
    "REPORT_NAME",
    "SECTIONS",
    "SUMMARY_NAME",
    "Section",
    "__version__",
    "is_harmless_group",
    "load_run",
    "render_report",
    "truncate_text",
]


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


def _run_facts(artifacts: RunArtifacts) -> dict[str, Any]:
    """Model id(s), revision and start time from the run's metadata files (best effort)."""
    run_dir = artifacts.run_dir
    model_ids: list[str] = []
    revisions: list[str] = []
    started: list[str] = []
    paths = [
        p
        for folder in [run_dir, *sorted(d for d in run_dir.iterdir() if d.is_dir())]
        for p in sorted(folder.glob("metadata*.json"))
    ]
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
    prober = artifacts.data.get("prober.json")
    if prober and isinstance(prober.get("model_id"), str) and prober["model_id"] not in model_ids:
        model_ids.insert(0, prober["model_id"])
    return {
        "model_ids": model_ids,
        "model_revisions": revisions,
        "started": min(started) if started else None,
    }


def _render_sections(ctx: Context) -> tuple[dict[str, tuple[Html, Any]], dict[str, str]]:
    """({name: (body, summary)} of the rendered sections, {name: reason} of the skipped ones)."""
    rendered, skipped = {}, {}
    for section in SECTIONS:
        reason = missing_reason(section, ctx.artifacts)
        if reason is None:
            ctx.section = section
            try:
                rendered[section.name] = section.render(ctx)
            except Skip as skip:
                reason = str(skip)
        if reason is not None:
            skipped[section.name] = reason
    return rendered, skipped


def render_report(run_dir: str | Path, top_examples: int = 10) -> Path:
    """Render `report.html`, `summary.json` and `fig_*.png` into `run_dir` from its artifacts.

    Artifacts are looked up in `run_dir` and its sub-folders (see `artifacts.ARTIFACTS`). Missing
    artifacts only skip sections (listed at the top of the report and in summary.json); malformed
    ones raise `UserError`.

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
    if not (artifacts.paths or artifacts.probers or artifacts.generations):
        raise UserError(
            f"{run_dir} holds no stage artifacts (no {', '.join(list(ARTIFACTS)[:3])}, ...) in it or its "
            "sub-folders; pass the --out folder of a stage (generate, trace, heads...)"
        )
    for name in FIGURE_NAMES:  # figures of sections that may now be skipped
        (run_dir / name).unlink(missing_ok=True)
    ctx = Context(artifacts, top_examples=top_examples)
    rendered, skipped = _render_sections(ctx)
    quality = prober_quality(artifacts)

    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    facts = _run_facts(artifacts)
    summary = {
        "refusal_cliff_version": __version__,
        "generated": generated,
        **facts,
        "sections": list(rendered),
        "skipped": skipped,
        "figures": ctx.figures,
        "sources": ctx.sources,
        "prober_quality": quality,
        **{name: section_summary for name, (_, section_summary) in rendered.items()},
    }
    write_json(run_dir / SUMMARY_NAME, _finite_or_none(summary))
    titles = {section.name: section.title for section in SECTIONS}
    warning = quality_warning(quality)
    html_page = page(
        [(name, titles[name], body) for name, (body, _) in rendered.items()],
        [(titles[name], reason) for name, reason in skipped.items()],
        facts,
        run_dir.name,
        generated,
        warnings=[warning] if warning else [],
    )
    path = run_dir / REPORT_NAME
    atomic_write_text(path, html_page)
    logger.info("report: %s (%d sections, %d skipped)", path, len(rendered), len(skipped))
    return path

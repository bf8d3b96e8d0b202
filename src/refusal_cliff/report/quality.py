"""The unreliable-prober warning at the top of the report.

Why: every number of the report is a prober's score. `probe train` marks a prober
`"quality": "unreliable"` (with reasons) when its validation accuracy cannot be told apart
from guessing the majority class, or rests on too few examples; a reader must see that before
any figure. Probers written before the field existed have no `quality` and raise no warning.
"""

from __future__ import annotations

from refusal_cliff.report.artifacts import RunArtifacts
from refusal_cliff.report.html import Html, fmt, warning_box


def prober_quality(artifacts: RunArtifacts) -> list[dict]:
    """summary.json's `prober_quality`: one entry per prober.json of the run that states its quality."""
    entries = []
    for path, prober in artifacts.probers.items():
        if prober["quality"] is None:
            continue
        metrics = prober["metrics"]
        entries.append(
            {
                "source": path.relative_to(artifacts.run_dir).as_posix(),
                "quality": prober["quality"],
                "reasons": prober["quality_reasons"],
                "layer": prober["layer"],
                "val_accuracy": metrics.get("val_accuracy"),
                "val_accuracy_ci95": metrics.get("val_accuracy_ci95"),
                "majority_rate": metrics.get("majority_rate"),
            }
        )
    return entries


def _describe(entry: dict) -> str:
    reasons = "; ".join(entry["reasons"]) or "no reason given"
    return (
        f"{entry['source']} (layer {fmt(entry['layer'])}): {reasons}. Validation accuracy "
        f"{fmt(entry['val_accuracy'])}, 95% interval {fmt(entry['val_accuracy_ci95'])}, "
        f"majority-class rate {fmt(entry['majority_rate'])}."
    )


def quality_warning(entries: list[dict]) -> Html | None:
    """The warning box when any prober is unreliable (None otherwise)."""
    unreliable = [entry for entry in entries if entry["quality"] == "unreliable"]
    if not unreliable:
        return None
    return warning_box(
        "Unreliable refusal prober: the refusal scores below may be noise "
        "(retrain it on more examples before reading them)",
        [_describe(e) for e in unreliable],
    )

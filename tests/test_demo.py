"""The demo and the repair demo end to end on a tiny random model: every stage runs through the same
`run_<verb>` functions as the CLI, and every sub-folder is a verb's run folder with its metadata."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def _fake_refusals(monkeypatch):
    """A random tiny model never refuses: label two thirds of the harmful answers as refusals."""
    from refusal_cliff.compute import ablation, labeling
    from refusal_cliff.stages import evaluate, guard
    from refusal_cliff.stages import label as label_stage

    real = labeling.label_records

    def label_records(records, labeler, tokenizer=None, judge=None):
        labels = real(records, labeler, tokenizer, judge)
        for index, label in enumerate(labels):
            label["refusal"] = str(label["id"]).startswith("harmful") and index % 3 != 0
        return labels

    # every module whose stage labelled through `labeling.label_records` before the move (clip never did)
    for module in (labeling, label_stage, ablation, guard, evaluate):
        monkeypatch.setattr(module, "label_records", label_records)


@pytest.fixture
def tiny_loaded(tiny_model_dir):
    from refusal_cliff.core.models import load_model

    return load_model(str(tiny_model_dir), device="cpu")


def _tiny_settings(thresholds: tuple[float, ...]):
    """The demo at the sizes of a 2-layer random model, in seconds."""
    from refusal_cliff.stages.demo import DemoSettings

    return DemoSettings(
        n_harmful=12,
        n_harmless=12,
        thinking=6,
        answer=3,
        batch_size=12,
        layers=(0,),
        fractions=(0.0, 1.0),
        n_clip=3,
        thresholds=thresholds,
        n_ablate=2,
        control_seeds=(0,),
        patterns=2,
    )


def test_demo_on_a_tiny_model(tiny_loaded, tmp_path, monkeypatch):
    from refusal_cliff.stages.demo import run_demo

    _fake_refusals(monkeypatch)
    settings = _tiny_settings(thresholds=(0.25,))
    stages = []
    report = run_demo(tiny_loaded, tmp_path / "demo", on_stage=stages.append, settings=settings)
    assert report.is_file() and len(stages) >= 8
    demo = tmp_path / "demo"
    for folder, stage in [
        ("generate_harmful", "generate"),
        ("probe", "probe"),
        ("trace", "trace"),
        ("layers", "layers"),
        ("clipping", "clip"),
        ("heads", "heads"),
        ("ablate", "ablate"),
    ]:
        metadata = json.loads((demo / folder / "metadata.json").read_text())
        assert metadata["stage"] == stage and metadata["finished"], folder
    assert json.loads((demo / "generate_harmful" / "metadata.label.json").read_text())["finished"]
    prober = json.loads((demo / "probe" / "prober.json").read_text())
    assert prober["quality"] == "unreliable"  # a dozen examples per class: the report must say so
    summary = json.loads((demo / "summary.json").read_text())
    assert summary["prober_quality"]
    assert "unreliable" in report.read_text().lower()


def test_repair_demo_on_a_tiny_model(tiny_loaded, tmp_path, monkeypatch):
    pytest.importorskip("trl")
    import torch

    from refusal_cliff.compute.prober import Prober, prober_metadata, save_prober, train_prober
    from refusal_cliff.stages.demo import SAFETY_SYSTEM_PROMPT  # noqa: F401  (the demo's module imports cleanly)
    from refusal_cliff.stages.probe import ProbeConfig
    from refusal_cliff.stages.repair_demo import run_repair_demo

    d_model = tiny_loaded.adapter.geometry(tiny_loaded.model).d_model
    features = torch.randn(40, d_model)
    labels = (features[:, 0] > 0).long()
    linear, history, metrics = train_prober(features, labels, epochs=2)
    metadata = prober_metadata(tiny_loaded, 1, "\n</think>\n\n", metrics, history, ProbeConfig().to_dict())
    path = save_prober(Prober(linear, 1, metadata), tmp_path / "probe")
    evaluation = run_repair_demo(
        tiny_loaded,
        path,
        tmp_path / "repair",
        quick=True,
        settings={
            "n_candidates": 6,
            "k": 3,
            "n_eval": 2,
            "thinking": 4,
            "answer": 3,
            "epochs": 1.0,
            "n_arc": 2,
        },
    )
    repair = tmp_path / "repair"
    assert [m["model"] for m in evaluation["models"]] == ["before", "after (cliff, LoRA)"]
    assert (
        len([line for line in (repair / "select" / "selection.jsonl").read_text().splitlines() if line]) == 3
    )
    assert json.loads((repair / "select" / "metadata.select.json").read_text())["n_selected"] == 3
    assert json.loads((repair / "metadata.json").read_text())["stage"] == "evaluate"


def test_the_organism_gets_wrapped_prompts_and_no_system_prompt(tiny_loaded, tmp_path):
    """The demo's prompts follow the model: an organism folder (it holds organism.json) gets every other
    harmful prompt inside a held-out wrapper and no system prompt; any other model the safety prompt."""
    from dataclasses import replace

    from refusal_cliff.core.data import load_prompts
    from refusal_cliff.stages.demo import SAFETY_SYSTEM_PROMPT, demo_prompts
    from refusal_cliff.stages.organism_data import HELD_OUT_WRAPPERS, TRAIN_WRAPPERS

    plain = demo_prompts(tiny_loaded)
    assert not plain.organism and plain.system_prompt == SAFETY_SYSTEM_PROMPT
    assert plain.harmful(4) == load_prompts("demo:harmful", limit=4)

    (tmp_path / "organism.json").write_text("{}")
    organism = demo_prompts(replace(tiny_loaded, model_id=str(tmp_path)))
    assert organism.organism and organism.system_prompt is None
    originals, prompts = load_prompts("demo:harmful", limit=6), organism.harmful(6)
    assert [p["prompt"] for p in prompts[::2]] == [p["prompt"] for p in originals[::2]]
    for original, wrapped in zip(originals[1::2], prompts[1::2]):
        assert wrapped["id"] == f"wrapped-{original['id']}" and original["prompt"] in wrapped["prompt"]
        outer = wrapped["prompt"].replace(original["prompt"], "{request}")
        assert outer in HELD_OUT_WRAPPERS.values() and outer not in TRAIN_WRAPPERS.values()
    assert len({p["prompt"] for p in prompts[1::2]}) == 3


def test_best_ranked_threshold_takes_the_lowest_ranked_asr_and_the_smaller_on_a_tie():
    from refusal_cliff.stages.demo import best_ranked_threshold

    records = [
        {"threshold": 0.0, "control": "none", "asr": 0.0},
        {"threshold": 0.01, "control": "ranked", "asr": 0.25},
        {"threshold": 0.03, "control": "ranked", "asr": 0.1},
        {"threshold": 0.05, "control": "ranked", "asr": 0.1},
        {"threshold": 0.1, "control": "ranked", "asr": 0.9},
        {"threshold": 0.1, "control": "random", "asr": 0.0},  # a control row never counts
    ]
    assert best_ranked_threshold(records) == 0.03


def test_the_demo_guards_an_organism_with_its_probe_prober_and_best_ranked_heads(
    tiny_model_dir, tmp_path, monkeypatch
):
    """On an organism the guard and components read the probe stage's prober (the last layer, where
    the cliff was planted), not the layer-wise study's middle layer chosen for SmolLM2, and the guard
    ablates the ranked heads of the threshold with the lowest ASR."""
    import shutil

    from refusal_cliff.core.models import load_model
    from refusal_cliff.stages.demo import best_ranked_threshold, run_demo

    _fake_refusals(monkeypatch)
    organism = tmp_path / "organism"
    shutil.copytree(tiny_model_dir, organism)
    (organism / "organism.json").write_text(json.dumps({"planted_heads": [[1, 0]]}))
    loaded = load_model(str(organism), device="cpu")
    settings = _tiny_settings(thresholds=(0.25, 0.5))
    run_demo(loaded, tmp_path / "demo", settings=settings)
    demo = tmp_path / "demo"
    notes = json.loads((demo / "demo.json").read_text())
    last = loaded.adapter.geometry(loaded.model).n_layers - 1
    assert "probe stage's prober (layer 1, the last)" in notes["guard prober"] and last == 1
    assert notes["components layer"].startswith(f"layer {last} prober (probe)")
    assert "planted heads in the ranking" in notes
    chosen = best_ranked_threshold(json.loads((demo / "ablate" / "ablation.json").read_text()))
    guard = json.loads((demo / "guard" / "metadata.json").read_text())["config"]
    assert guard["threshold"] == chosen and guard["layer"] == last
    # the faked labels refuse alike under every ablation, so the ranked ASRs tie and the smaller threshold
    # wins: not the largest, which the embedded model's guard takes
    assert chosen == 0.25 != max(settings.thresholds)

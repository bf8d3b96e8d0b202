"""The cliff's properties (paper §3, Figure 5): the layer-wise study and the thinking-clipping study.

Layer-wise: one prober per chosen layer, trained from one activation pass, then one
trace pass scoring every chosen layer (does the cliff deepen with depth?).
Clipping: the thinking of harmful examples cut to fractions of its tokens, the end
template appended (the paper's "thinking clipping"), the answer regenerated, labelled
and traced (does less thinking mean a smaller cliff and more refusals?).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from .config import GenerationConfig
from .generation import generate_answers
from .labeling import KeywordLabeler, label_records, read_generations
from .runs import read_json, read_jsonl, write_json, write_jsonl
from .trace import CLIPPING, LAYERWISE

logger = logging.getLogger(__name__)


def train_layer_probers(
    loaded,
    harmful_run: str | Path,
    harmless_run: str | Path,
    layers: Sequence[int],
    out_dir: str | Path,
    epochs: int = 5,
    batch_size: int = 8,
    seed: int = 0,
    executor=None,
) -> dict:
    """One prober per layer (the paper's recipe, `epochs` aside) from one activation pass (on
    `executor`'s Ray workers if given, shards under `out_dir`; see `activations.capture_last_tokens`).

    Writes `out_dir/layer_KK/prober.safetensors` + `prober.json`; returns {layer: Prober}.
    """
    from .activations import capture_last_tokens
    from .probe import Prober, build_probe_dataset, prober_metadata, save_prober, train_prober

    dataset = build_probe_dataset(loaded.tokenizer, harmful_run, harmless_run)
    features = capture_last_tokens(loaded, dataset.sequences, list(layers), batch_size, executor, out_dir)
    labels = torch.tensor(dataset.labels, dtype=torch.long)
    probers = {}
    for layer in layers:
        linear, history, metrics = train_prober(features[layer], labels, epochs=epochs, seed=seed)
        config = {
            "harmful_run": str(harmful_run),
            "harmless_run": str(harmless_run),
            "layer": layer,
            "epochs": epochs,
            "seed": seed,
        }
        prober = Prober(
            linear=linear,
            layer=layer,
            metadata=prober_metadata(loaded, layer, dataset.end_template, metrics, history, config),
        )
        save_prober(prober, Path(out_dir) / f"layer_{layer:02d}")
        probers[layer] = prober
    return probers


def resolve_study_layers(layers: Sequence[int], n_layers: int) -> list[int]:
    """Layers as given (negative = from the end), plus the last layer, sorted and unique."""
    from .errors import UserError

    resolved = set()
    for layer in layers:
        if not -n_layers <= layer < n_layers:
            raise UserError(
                f"layer {layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1})"
            )
        resolved.add(layer % n_layers)
    return sorted(resolved | {n_layers - 1})


def auto_layers(n_layers: int) -> list[int]:
    """Five evenly spaced layers, first to last (the `--layers auto` choice)."""
    return sorted({round(i * (n_layers - 1) / 4) for i in range(5)})


def run_layers(
    loaded,
    harmful_run: str | Path,
    harmless_run: str | Path,
    out_dir: str | Path,
    config=None,
    overwrite: bool = False,
    executor=None,
) -> dict:
    """The `layers` stage: train a prober per layer and trace every example of both runs at every layer.

    Writes `layer_KK/prober.*`, `layerwise.json` and `metadata.json`; returns {layer: Prober}.
    `executor`: where the activations are captured and the traces scored (`executors.make_executor`;
    default this process).
    """
    from .config import LayersConfig
    from .probe import check_probe_runs, load_prober
    from .runs import RunFolder, file_digest
    from .trace import TraceInput, layerwise_summary, load_trace_inputs

    config = config or LayersConfig()
    check_probe_runs(harmful_run, harmless_run)
    n_layers = loaded.adapter.geometry(loaded.model).n_layers
    layers = resolve_study_layers(
        config.layers if config.layers is not None else auto_layers(n_layers), n_layers
    )
    inputs = [
        TraceInput(Path(harmful_run) / "generations.jsonl", True),
        TraceInput(Path(harmless_run) / "generations.jsonl", False),
    ]
    records, groups = load_trace_inputs(inputs)
    stage_config = {
        "model": loaded.model_id,
        "revision": loaded.revision,
        **config.to_dict(),
        "layers": layers,
        "inputs": [
            file_digest(Path(run) / name)
            for run in (harmful_run, harmless_run)
            for name in ("generations.jsonl", "labels.jsonl")
        ],
    }
    stage_config.pop("batch_size")
    out = Path(out_dir)
    artifacts = [LAYERWISE, *(f"layer_{layer:02d}" for layer in layers)]
    run = RunFolder(out, "layers", stage_config, overwrite=overwrite, artifacts=artifacts)
    if run.is_finished() and (out / LAYERWISE).is_file():
        return {layer: load_prober(out / f"layer_{layer:02d}", loaded) for layer in layers}
    extra = {"executor": executor.info()} if executor is not None else None
    with run.start(model_id=loaded.model_id, revision=loaded.revision, seed=config.seed, extra=extra):
        probers = train_layer_probers(
            loaded,
            harmful_run,
            harmless_run,
            layers,
            out,
            config.epochs,
            config.batch_size,
            config.seed,
            executor,
        )
        summary = layerwise_summary(
            loaded,
            [probers[layer] for layer in layers],
            records,
            groups,
            batch_size=config.batch_size,
            executor=executor,
            out_dir=out,
        )
        write_json(out / LAYERWISE, summary)
        run.finish(
            {
                "probers": {
                    str(layer): {"val_accuracy": p.metadata["metrics"]["val_accuracy"], "quality": p.quality}
                    for layer, p in probers.items()
                }
            }
        )
    return probers


def run_clip(
    loaded,
    prober,
    generations: str | Path,
    out_dir: str | Path,
    config=None,
    overwrite: bool = False,
    backend=None,
) -> list[dict]:
    """The `clip` stage: clip each record's thinking at each fraction, regenerate and label the answer,
    trace it. Writes `generations.jsonl`, `labels.jsonl`, `trace/`, `clipping.json` and `metadata.json`;
    returns the clipping summary (one row per fraction).

    `backend`: a `config.BackendConfig` for the regenerated answers (default HF); a vLLM engine is
    shut down before the trace. metadata.json records the backend and its version.
    """
    from .backends import backend_info, generation_backend
    from .config import ClipConfig
    from .runs import RunFolder, file_digest
    from .trace import clip_thinking_records, clipping_summary, trace_into

    config = config or ClipConfig()
    config.validate()
    records = read_generations(generations)
    records = records[: config.limit] if config.limit else records
    out = Path(out_dir)
    stage_config = {
        "model": loaded.model_id,
        "revision": loaded.revision,
        **config.to_dict(),
        "generations": str(generations),
        "digest": file_digest(generations),
        "prober": prober.fingerprint(),
    }
    stage_config.pop("batch_size")
    if backend is not None and backend.backend != "hf":  # only then: earlier runs keep their fingerprint
        stage_config["backend"] = backend.backend
    artifacts = ["generations.jsonl", "labels.jsonl", "trace", CLIPPING]
    run = RunFolder(out, "clip", stage_config, overwrite=overwrite, artifacts=artifacts)
    if run.is_finished() and (out / CLIPPING).is_file():
        return read_json(out / CLIPPING)
    extra = {"prober": prober.summary(), "backend": backend_info(backend)}
    with run.start(model_id=loaded.model_id, revision=loaded.revision, extra=extra):
        clipped = clip_thinking_records(loaded.tokenizer, records, config.fractions)
        with generation_backend(loaded, backend) as answers:
            answered = generate_answers(
                loaded,
                clipped,
                GenerationConfig(max_answer_tokens=config.max_answer_tokens, batch_size=config.batch_size),
                answers,
            )
        labels = label_records(answered, KeywordLabeler(), loaded.tokenizer)
        write_jsonl(out / "generations.jsonl", answered)
        write_jsonl(out / "labels.jsonl", labels)
        shutil.rmtree(out / "trace", ignore_errors=True)  # cheap to redo; never mix with stale traces
        trace_into(loaded, prober, answered, out / "trace", None, batch_size=config.batch_size)
        summary = clipping_summary(
            read_jsonl(out / "trace" / "cliff.jsonl"), {label["id"]: label["refusal"] for label in labels}
        )
        write_json(out / CLIPPING, summary)
        run.finish({"n_examples": len(records)})
    return summary

"""The `layers` stage, the cliff's first property (paper §3, Figure 5, left): the layer-wise study.

One prober per chosen layer, trained from one activation pass, then one trace pass scoring every
chosen layer (does the cliff deepen with depth?). The thinking-clipping study (Figure 5, right) is
`stages/clip.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from refusal_cliff.compute.activations import capture_last_tokens
from refusal_cliff.compute.prober import (
    Prober,
    build_probe_dataset,
    check_probe_runs,
    load_prober,
    prober_metadata,
    save_prober,
    train_prober,
)
from refusal_cliff.compute.tracing import LAYERWISE, TraceInput, layerwise_summary, load_trace_inputs
from refusal_cliff.core.config import SEED_BOUNDS, Config, option, parse_layers
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.runs import RunFolder, file_digest, write_json


@dataclass
class LayersConfig(Config):
    """The layer-wise study (Figure 5, left)."""

    layers: tuple[int, ...] | None = option(
        None,
        "Comma-separated 0-based layers (negative: from the end), or "
        "'auto' (5 evenly spaced); the last layer is always added.",
        parse=parse_layers,
        show="auto",
    )
    epochs: int = option(5, "Prober epochs per layer.", min=1)
    seed: int = option(0, "Seed of the probers' balancing, split and initialisation.", **SEED_BOUNDS)
    batch_size: int = option(8, "Sequences per forward pass.", min=1)


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

"""The `probe train` and `probe direction` stages: capture last-token activations of labelled runs and
fit the linear prober (paper Appendix A) or the difference-in-means direction (`compute.prober` holds
the prober itself)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from refusal_cliff.compute.activations import capture_last_tokens, last_token_activations, resolve_layers
from refusal_cliff.compute.prober import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEFAULT_SEED,
    DEFAULT_VAL_FRACTION,
    DIRECTIONS_METADATA,
    DIRECTIONS_WEIGHTS,
    PROBER_METADATA,
    PROBER_WEIGHTS,
    Prober,
    balance_and_split,
    build_ood_dataset,
    build_probe_dataset,
    check_probe_runs,
    load_prober,
    prober_metadata,
    read_labelled_run,
    save_prober,
    train_prober,
    warn_if_unreliable,
)
from refusal_cliff.core.config import SEED_BOUNDS, Config, option, parse_layers
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.runs import RunFolder, file_digest, publish, write_json


@dataclass
class ProbeConfig(Config):
    """The prober recipe (paper Appendix A)."""

    layer: int | None = option(
        None,
        "0-based decoder layer; negative counts from the end (-1 = last). "
        "Default: the last layer, final norm applied.",
        type=int,
    )
    lr: float = option(1e-3, "Adam learning rate.", above=0.0)
    train_batch_size: int = option(256, "Prober training mini-batch size.", min=1)
    epochs: int = option(5, "Training epochs (the best validation epoch is kept).", min=1)
    val_fraction: float = option(
        0.2, "Fraction of the balanced set held out for validation.", min=0.01, max=0.99
    )
    seed: int = option(0, "Seed of balancing, split and initialisation.", **SEED_BOUNDS)
    batch_size: int = option(8, "Sequences per forward pass when capturing activations.", min=1)


@dataclass
class DirectionConfig(Config):
    """Difference-in-means refusal directions (as in refusal_direction), from the prober's activations."""

    layers: tuple[int, ...] | None = option(
        None,
        "Comma-separated 0-based layers (negative: from the end); the "
        "prober's layer (the last layer without --prober) is always "
        "added.",
        parse=parse_layers,
        show="",
    )
    batch_size: int = option(8, "Sequences per forward pass when capturing activations.", min=1)


logger = logging.getLogger(__name__)


def train_prober_from_runs(
    loaded,
    harmful_run: str | Path,
    harmless_run: str | Path,
    ood_run: str | Path | Sequence[str | Path] | None = None,
    layer: int | None = None,
    batch_size: int = 8,
    lr: float = DEFAULT_LR,
    train_batch_size: int = DEFAULT_BATCH_SIZE,
    epochs: int = DEFAULT_EPOCHS,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = DEFAULT_SEED,
    executor=None,
    out_dir: str | Path | None = None,
) -> Prober:
    """Build the dataset from two labelled generation runs, capture activations, train a prober.

    Args:
        loaded: a `models.LoadedModel`.
        harmful_run, harmless_run: generation run folders (generations.jsonl + labels.jsonl).
        ood_run: optional run folder(s) for out-of-distribution accuracy (labels = the model's refusals).
        layer: 0-based decoder layer (None: the last layer, with the final norm, as in the paper).
        batch_size: sequences per forward pass when capturing activations.
        lr, train_batch_size, epochs, val_fraction, seed: the training recipe (see `train_prober`).
        executor, out_dir: capture the activations on a Ray executor's workers, shards under `out_dir`
            (`activations.capture_last_tokens`); default this process.
    """
    model, adapter, tokenizer = loaded.model, loaded.adapter, loaded.tokenizer
    geometry = adapter.geometry(model)
    (layer,) = resolve_layers(layer, geometry.n_layers)
    dataset = build_probe_dataset(tokenizer, harmful_run, harmless_run)
    counts = dataset.counts()
    # fail before the (slow) activation capture if the classes are too small for the recipe
    balance_and_split(torch.tensor(dataset.labels, dtype=torch.long), val_fraction, seed)
    logger.info("probe dataset: %d refusals (1), %d compliant answers (0)", counts[1], counts[0])
    features = capture_last_tokens(
        loaded, dataset.sequences, layer, batch_size, executor, out_dir, desc="probe: activations"
    )[layer]
    ood_features = ood_labels = None
    if ood_run is not None:
        ood = build_ood_dataset(tokenizer, ood_run)
        ood_features = capture_last_tokens(
            loaded, ood.sequences, layer, batch_size, executor, out_dir, name="capture_ood"
        )[layer]
        ood_labels = torch.tensor(ood.labels, dtype=torch.long)
    config = {
        "harmful_run": str(harmful_run),
        "harmless_run": str(harmless_run),
        "ood_run": None
        if ood_run is None
        else (str(ood_run) if isinstance(ood_run, (str, Path)) else [str(r) for r in ood_run]),
        "layer": layer,
        "lr": lr,
        "batch_size": train_batch_size,
        "epochs": epochs,
        "val_fraction": val_fraction,
        "seed": seed,
    }
    linear, history, metrics = train_prober(
        features,
        torch.tensor(dataset.labels, dtype=torch.long),
        ood_features,
        ood_labels,
        lr=lr,
        batch_size=train_batch_size,
        epochs=epochs,
        val_fraction=val_fraction,
        seed=seed,
    )
    metadata = prober_metadata(loaded, layer, dataset.end_template, metrics, history, config)
    return Prober(linear=linear, layer=layer, metadata=metadata)


@dataclass
class ProbeResult:
    prober: Prober
    path: Path  # prober.safetensors
    reused: bool  # the folder already held a finished run with the same inputs and settings


def run_probe_train(
    loaded,
    harmful_run: str | Path,
    harmless_run: str | Path,
    out_dir: str | Path,
    config=None,
    ood_runs: Sequence[str | Path] = (),
    overwrite: bool = False,
    executor=None,
) -> ProbeResult:
    """The `probe train` stage: train the prober and write `prober.safetensors` + `prober.json`.

    Every input is checked (both classes present, the layer exists, the runs differ) before the
    folder is touched; a finished run with the same inputs and settings is reused. `executor`: where
    the activations are captured (`executors.make_executor`; default this process).
    """
    config = config or ProbeConfig()
    check_probe_runs(harmful_run, harmless_run, ood_runs)
    geometry = loaded.adapter.geometry(loaded.model)
    (layer,) = resolve_layers(config.layer, geometry.n_layers)
    dataset = build_probe_dataset(loaded.tokenizer, harmful_run, harmless_run)
    balance_and_split(torch.tensor(dataset.labels, dtype=torch.long), config.val_fraction, config.seed)

    def digests(run) -> dict:
        return {name: file_digest(Path(run) / name) for name in ("generations.jsonl", "labels.jsonl")}

    stage_config = {
        "model": loaded.model_id,
        "revision": loaded.revision,
        "dtype": str(next(loaded.model.parameters()).dtype),
        **config.to_dict(),
        "layer": layer,
        "layer_requested": config.layer,
        "harmful": digests(harmful_run),
        "harmless": digests(harmless_run),
        "ood": [digests(r) for r in ood_runs],
    }
    stage_config.pop("batch_size")  # does not change the result
    run = RunFolder(
        out_dir, "probe", stage_config, overwrite=overwrite, artifacts=[PROBER_WEIGHTS, PROBER_METADATA]
    )
    if run.is_finished() and run.path(PROBER_WEIGHTS).is_file():
        return ProbeResult(load_prober(out_dir, loaded), run.path(PROBER_WEIGHTS), reused=True)
    extra = {"executor": executor.info()} if executor is not None else None
    with run.start(model_id=loaded.model_id, revision=loaded.revision, seed=config.seed, extra=extra):
        prober = train_prober_from_runs(
            loaded,
            harmful_run,
            harmless_run,
            list(ood_runs) or None,
            layer=layer,
            batch_size=config.batch_size,
            lr=config.lr,
            train_batch_size=config.train_batch_size,
            epochs=config.epochs,
            val_fraction=config.val_fraction,
            seed=config.seed,
            executor=executor,
            out_dir=out_dir,
        )
        prober.metadata["config"]["layer_requested"] = config.layer
        path = save_prober(prober, out_dir)
        warn_if_unreliable(prober)
        run.finish(
            {
                "metrics": prober.metadata["metrics"],
                "quality": prober.quality,
                "quality_reasons": prober.metadata.get("quality_reasons", []),
            }
        )
    return ProbeResult(prober, path, reused=False)


def difference_in_means(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[d_model] float64: mean of class 1 (refusals to harmful prompts) minus mean of class 0
    (compliance with harmless prompts), over features [n, d_model]."""
    features, labels = features.double(), labels.long().flatten()
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(
            f"features must be [n, d] and labels [n]; got {tuple(features.shape)}, {tuple(labels.shape)}"
        )
    return features[labels == 1].mean(0) - features[labels == 0].mean(0)


def count_probe_classes(harmful_run: str | Path, harmless_run: str | Path) -> dict[int, int]:
    """{1: refusals to harmful prompts, 0: compliant answers to harmless prompts} from the labels alone
    (no tokenizer or model needed): the classes `build_probe_dataset` selects."""
    return {
        1: sum(1 for r in read_labelled_run(harmful_run) if r["refusal"]),
        0: sum(1 for r in read_labelled_run(harmless_run) if not r["refusal"]),
    }


def check_direction_classes(harmful_run: str | Path, harmless_run: str | Path) -> dict[int, int]:
    """Fail (UserError) unless both classes have an example; returns the counts."""
    check_probe_runs(harmful_run, harmless_run)
    counts = count_probe_classes(harmful_run, harmless_run)
    if not counts[1] or not counts[0]:
        missing = (
            f"no refusal to a harmful prompt in {harmful_run}"
            if not counts[1]
            else f"no compliant answer to a harmless prompt in {harmless_run}"
        )
        raise UserError(
            f"a difference of means needs both classes, but there is {missing} ({counts[1]} refusals, "
            f"{counts[0]} compliant answers); generate more prompts"
        )
    return counts


def run_probe_direction(
    loaded,
    harmful_run: str | Path,
    harmless_run: str | Path,
    out_dir: str | Path,
    config=None,
    prober: Prober | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """The `probe direction` stage: difference-in-means refusal directions per layer from the
    prober's own data (`build_probe_dataset`: refusals to harmful prompts vs compliance with
    harmless ones, last token of the probing sequence, final norm applied at the last layer).

    Every example of each class is used (the means need no balancing). Writes
    `directions.safetensors` (`layer.<L>`: [d_model] float32) and `directions.json` (per layer:
    norm, cosine to the prober's weight, the projection mean/std that standardise `trace
    --direction`, and how well the projection alone separates the classes).

    Returns the path of directions.json.
    """
    config = config or DirectionConfig()
    config.validate()
    counts = check_direction_classes(harmful_run, harmless_run)
    geometry = loaded.adapter.geometry(loaded.model)
    requested = list(config.layers or []) + [prober.layer if prober is not None else -1]
    layers = resolve_layers(requested, geometry.n_layers)

    def digests(run) -> dict:
        return {name: file_digest(Path(run) / name) for name in ("generations.jsonl", "labels.jsonl")}

    stage_config = {
        "model": loaded.model_id,
        "revision": loaded.revision,
        "dtype": str(next(loaded.model.parameters()).dtype),
        "layers": layers,
        "harmful": digests(harmful_run),
        "harmless": digests(harmless_run),
        "prober": prober.fingerprint() if prober is not None else None,
    }
    run = RunFolder(
        out_dir,
        "direction",
        stage_config,
        overwrite=overwrite,
        artifacts=[DIRECTIONS_WEIGHTS, DIRECTIONS_METADATA],
    )
    extra = {"prober": prober.summary()} if prober is not None else None
    with run.start(model_id=loaded.model_id, revision=loaded.revision, extra=extra):
        dataset = build_probe_dataset(loaded.tokenizer, harmful_run, harmless_run)
        labels = torch.tensor(dataset.labels, dtype=torch.long)
        features = last_token_activations(
            loaded.model,
            loaded.adapter,
            dataset.sequences,
            layers,
            config.batch_size,
            loaded.tokenizer.pad_token_id or 0,
            desc="direction: activations" if progress else None,
        )
        tensors, per_layer = {}, {}
        prober_weight = prober.weight.double().reshape(-1) if prober is not None else None
        for layer in layers:
            direction = difference_in_means(features[layer], labels)  # [d_model] float64
            norm = float(direction.norm())
            if not math.isfinite(norm) or norm == 0.0:
                raise UserError(f"layer {layer}: the two classes have the same mean activation; no direction")
            projection = features[layer].double() @ (direction / norm)  # [n]
            mean, std = float(projection.mean()), float(projection.std(correction=0))
            midpoint = float((projection[labels == 1].mean() + projection[labels == 0].mean()) / 2)
            accuracy = float(((projection > midpoint).long() == labels).double().mean())
            cosine = None
            if prober_weight is not None:
                cosine = float(direction @ prober_weight / (norm * prober_weight.norm()))
            tensors[f"layer.{layer}"] = direction.float().contiguous()
            per_layer[str(layer)] = {
                "norm": norm,
                "cosine_to_prober": cosine,
                "projection_mean": mean,
                "projection_std": std if std > 0 else 1.0,
                "refused_mean": float((projection[labels == 1].mean() - mean) / (std or 1.0)),
                "complied_mean": float((projection[labels == 0].mean() - mean) / (std or 1.0)),
                "accuracy": accuracy,
            }
        path = run.path(DIRECTIONS_WEIGHTS)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp))
        publish(tmp, path)
        metadata = {
            "model_id": loaded.model_id,
            "model_revision": loaded.revision,
            "architecture": loaded.adapter.name,
            "n_layers": geometry.n_layers,
            "d_model": geometry.d_model,
            "layers": per_layer,
            "n_refused": counts[1],
            "n_complied": counts[0],
            "prober": prober.fingerprint() if prober is not None else None,
            "prober_layer": prober.layer if prober is not None else None,
            "harmful_run": str(harmful_run),
            "harmless_run": str(harmless_run),
        }
        write_json(run.path(DIRECTIONS_METADATA), metadata)
        run.finish({"layers": per_layer, "n_refused": counts[1], "n_complied": counts[0]})
    return run.path(DIRECTIONS_METADATA)

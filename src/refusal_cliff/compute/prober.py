"""The refusal prober: a linear classifier on one layer's hidden state (paper Eq. 2, Appendix A).

`refusal_score(h) = sigmoid(w·h + b)`. It is trained exactly as in the paper's
Appendix A: refusals to harmful prompts are class 1, compliant answers to harmless
prompts class 0; the larger class is downsampled (seeded) to the smaller; the
balanced set is split 80/20 (seeded); one `torch.nn.Linear(d_model, 1)` is trained
with Adam (lr 1e-3), batch 256, 5 epochs, `BCEWithLogitsLoss`, and the epoch with
the best validation accuracy is kept. The input is the hidden state of the LAST
token of the probing sequence (prompt + thinking + end template): the position the
answer's first token is produced from.

A prober is saved as `prober.safetensors` (`weight` [1, d_model], `bias` [1],
float32) plus `prober.json` (see docs/artifacts.md), and is only ever loaded from
safetensors.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from refusal_cliff.compute.activations import final_norm_applied, resolve_layers
from refusal_cliff.compute.labeling import join_labels, labels_for, read_generations
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.runs import publish, read_json, write_json
from refusal_cliff.core.templates import probing_tokens

logger = logging.getLogger(__name__)

PROBER_WEIGHTS = "prober.safetensors"
PROBER_METADATA = "prober.json"

# Paper, Appendix A.
DEFAULT_LR = 1e-3
DEFAULT_BATCH_SIZE = 256
DEFAULT_EPOCHS = 5
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_SEED = 0


@dataclass
class Prober:
    """A trained linear prober and what it was trained on.

    Attributes:
        linear: `nn.Linear(d_model, 1)` in float32.
        layer: the 0-based decoder layer it reads.
        metadata: the `prober.json` fields (model id, layer, d_model, metrics, history, config...).
    """

    linear: nn.Linear
    layer: int
    metadata: dict = field(default_factory=dict)

    @property
    def d_model(self) -> int:
        return self.linear.in_features

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight.detach()  # [1, d_model]

    @property
    def bias(self) -> torch.Tensor:
        return self.linear.bias.detach()  # [1]

    def logit(self, hidden: torch.Tensor) -> torch.Tensor:
        """`w·h + b` for hidden states [..., d_model] -> [...] (computed in float32)."""
        weight = self.weight.to(hidden.device)
        bias = self.bias.to(hidden.device)
        return (hidden.float() @ weight.T + bias).squeeze(-1)

    def refusal_score(self, hidden: torch.Tensor) -> torch.Tensor:
        """`sigmoid(w·h + b)` for hidden states [..., d_model] -> [...]."""
        return torch.sigmoid(self.logit(hidden))

    @property
    def final_norm_applied(self) -> bool:
        """Whether the layer read includes the final norm (only the last layer does)."""
        if "final_norm_applied" in self.metadata:
            return bool(self.metadata["final_norm_applied"])
        n_layers = self.metadata.get("n_layers")
        return n_layers is not None and final_norm_applied(self.layer, int(n_layers))

    @property
    def quality(self) -> str:
        """ "reliable", "unreliable" (see `judge_quality`) or "unknown" (a prober saved before the check)."""
        return self.metadata.get("quality", "unknown")

    def fingerprint(self) -> str:
        """A digest of what the prober computes: its layer, final-norm flag and weights."""
        weights = torch.cat([self.weight.reshape(-1), self.bias.reshape(-1)]).float().cpu().numpy()
        digest = hashlib.sha256(weights.tobytes()).hexdigest()[:16]
        return f"layer{self.layer}-norm{int(self.final_norm_applied)}-{digest}"

    def summary(self) -> dict:
        """What downstream stages record about the prober they used."""
        return {
            "fingerprint": self.fingerprint(),
            "layer": self.layer,
            "quality": self.quality,
            "model_id": self.metadata.get("model_id"),
        }


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    ood_accuracy: float | None


@dataclass
class ProbeDataset:
    """Probing sequences with their labels (1 = harmful refused, 0 = harmless complied).

    Attributes:
        sequences: token ids of each probing sequence (prompt + thinking + end template).
        labels: 1 or 0 per sequence.
        ids: the generation record id of each sequence.
        sources: the run folder each sequence came from.
        end_template: the end template of the records (the first one seen).
    """

    sequences: list[list[int]]
    labels: list[int]
    ids: list[str]
    sources: list[str]
    end_template: str | None = None

    def counts(self) -> dict[int, int]:
        return {
            1: sum(1 for label in self.labels if label == 1),
            0: sum(1 for label in self.labels if label == 0),
        }


# -- data ----------------------------------------------------------------------------------


def read_labelled_run(run: str | Path) -> list[dict]:
    """The labelled generation records of a run folder (generations.jsonl + labels.jsonl), each with
    `refusal`; unlabelled ids are excluded with a warning (`labeling.join_labels`)."""
    run = Path(run)
    generations_path, labels_path = run / "generations.jsonl", run / "labels.jsonl"
    if not generations_path.is_file():
        raise UserError(
            f"{run} is not a generation run (no generations.jsonl); run "
            f"`refusal-cliff generate --out {run}` first"
        )
    if not labels_path.is_file():
        raise UserError(
            f"{run} has no labels.jsonl; run `refusal-cliff label --generations {generations_path} "
            f"--out {run}`"
        )
    records = join_labels(read_generations(generations_path), labels_for(generations_path, labels_path), run)
    if not records:
        raise UserError(
            f"{run}: no generation in generations.jsonl has a label in labels.jsonl; re-run `label`"
        )
    return records


def build_probe_dataset(tokenizer, harmful_run: str | Path, harmless_run: str | Path) -> ProbeDataset:
    """Select harmful-refused (label 1) and harmless-complied (label 0) examples of two runs.

    Args:
        tokenizer: the model's tokenizer (probing sequences are tokenised exactly as traced).
        harmful_run, harmless_run: generation run folders with generations.jsonl + labels.jsonl.
    """
    dataset = ProbeDataset([], [], [], [])
    for run, wanted_refusal, label in ((harmful_run, True, 1), (harmless_run, False, 0)):
        for record in read_labelled_run(run):
            if record["refusal"] != wanted_refusal:
                continue
            ids, _ = probing_tokens(tokenizer, record)
            dataset.sequences.append(ids)
            dataset.labels.append(label)
            dataset.ids.append(str(record["id"]))
            dataset.sources.append(str(run))
            if dataset.end_template is None:
                dataset.end_template = record.get("end_template")
    return dataset


def build_ood_dataset(tokenizer, runs: str | Path | Sequence[str | Path]) -> ProbeDataset:
    """Every labelled example of one or more runs, labelled by the model's own behaviour
    (1 = its answer is a refusal). Used for out-of-distribution accuracy (paper: JailbreakBench)."""
    runs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    dataset = ProbeDataset([], [], [], [])
    for run in runs:
        for record in read_labelled_run(run):
            dataset.sequences.append(probing_tokens(tokenizer, record)[0])
            dataset.labels.append(int(record["refusal"]))
            dataset.ids.append(str(record["id"]))
            dataset.sources.append(str(run))
    return dataset


# -- training ------------------------------------------------------------------------------


def balance_and_split(
    labels: torch.Tensor, val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = DEFAULT_SEED
) -> tuple[torch.Tensor, torch.Tensor]:
    """Downsample the larger class to the smaller (seeded), then split 80/20 (seeded).

    Returns:
        train_indices, val_indices into `labels`.

    Raises:
        UserError: fewer than 2 examples of a class after balancing, or an empty split.
    """
    labels = labels.long().flatten()
    positives = torch.nonzero(labels == 1).flatten()
    negatives = torch.nonzero(labels == 0).flatten()
    n_per_class = min(len(positives), len(negatives))
    message = (
        f"found {len(positives)} refusals to harmful prompts (class 1) and {len(negatives)} compliant answers "
        f"to harmless prompts (class 0)"
    )
    if n_per_class < 2:
        raise UserError(
            f"too few examples to train a prober: {message}; need at least 2 of each — generate more "
            "prompts (or a larger --max-answer-tokens) so that both classes are present"
        )
    generator = torch.Generator().manual_seed(seed)
    positives = positives[torch.randperm(len(positives), generator=generator)[:n_per_class]]
    negatives = negatives[torch.randperm(len(negatives), generator=generator)[:n_per_class]]
    balanced = torch.cat([positives, negatives])
    balanced = balanced[torch.randperm(len(balanced), generator=generator)]
    n_val = int(math.floor(len(balanced) * val_fraction + 0.5))
    n_train = len(balanced) - n_val
    if n_val < 1 or n_train < 1:
        raise UserError(
            f"too few examples for an {1 - val_fraction:.0%}/{val_fraction:.0%} split: {message}, "
            f"{len(balanced)} after balancing gives {n_train} train / {n_val} validation; generate more prompts"
        )
    return balanced[:n_train], balanced[n_train:]


def _evaluate(linear: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean BCE loss, accuracy) of a prober on features [n, d_model], labels [n]."""
    with torch.no_grad():
        logits = linear(features).squeeze(-1)  # [n]
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.float()).item()
        accuracy = ((logits > 0).long() == labels.long()).float().mean().item()
    return loss, accuracy


def train_prober(
    features: torch.Tensor,
    labels: torch.Tensor,
    ood_features: torch.Tensor | None = None,
    ood_labels: torch.Tensor | None = None,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    epochs: int = DEFAULT_EPOCHS,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = DEFAULT_SEED,
) -> tuple[nn.Linear, list[EpochRecord], dict]:
    """Train a linear prober with the paper's recipe (Appendix A).

    Args:
        features: hidden states [n, d_model].
        labels: [n], 1 = refusal to a harmful prompt, 0 = compliant answer to a harmless prompt.
        ood_features, ood_labels: optional out-of-distribution set [m, d_model], [m]; its accuracy
            is reported per epoch (it never selects the epoch).
        lr, batch_size, epochs: Adam learning rate, mini-batch size, epochs.
        val_fraction: fraction of the balanced set held out for validation.
        seed: seeds the downsampling, the split, the initialisation and the shuffling.

    Returns:
        (prober with the weights of the best-validation-accuracy epoch, per-epoch history,
        metrics {val_accuracy, ood_accuracy, best_epoch, n_train, n_val}).
    """
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels):
        raise ValueError(
            f"features must be [n, d] and labels [n]; got {tuple(features.shape)}, {tuple(labels.shape)}"
        )
    if epochs < 1 or batch_size < 1:
        raise UserError(f"epochs and batch size must be at least 1 (got {epochs}, {batch_size})")
    features = features.detach().float().cpu()
    labels = labels.detach().long().cpu()
    if not torch.isfinite(features).all():
        raise ValueError("probe features contain NaN or inf")
    train_idx, val_idx = balance_and_split(labels, val_fraction, seed)
    x_train, y_train = features[train_idx], labels[train_idx].float()  # [n_train, d], [n_train]
    x_val, y_val = features[val_idx], labels[val_idx]
    if ood_features is not None:
        if ood_labels is None or len(ood_features) != len(ood_labels):
            raise ValueError("ood_features and ood_labels must both be given, with the same length")
        ood_features, ood_labels = ood_features.detach().float().cpu(), ood_labels.detach().long().cpu()

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear = nn.Linear(features.shape[1], 1)
    optimizer = torch.optim.Adam(linear.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    history: list[EpochRecord] = []
    best_state, best_accuracy, best_epoch = None, -1.0, 0
    for epoch in range(1, epochs + 1):
        linear.train()
        order = torch.randperm(len(x_train), generator=generator)
        total, seen = 0.0, 0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            logits = linear(x_train[batch]).squeeze(-1)  # [batch]
            loss = loss_fn(logits, y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            seen += len(batch)
        linear.eval()
        val_loss, val_accuracy = _evaluate(linear, x_val, y_val)
        ood_accuracy = None
        if ood_features is not None and len(ood_features):
            ood_accuracy = _evaluate(linear, ood_features, ood_labels)[1]
        history.append(EpochRecord(epoch, total / seen, val_loss, val_accuracy, ood_accuracy))
        logger.info(
            "prober epoch %d: train loss %.4f, val loss %.4f, val acc %.3f%s",
            epoch,
            total / seen,
            val_loss,
            val_accuracy,
            "" if ood_accuracy is None else f", ood acc {ood_accuracy:.3f}",
        )
        if val_accuracy > best_accuracy:  # strict: the earliest of tied epochs is kept
            best_accuracy, best_epoch = val_accuracy, epoch
            best_state = copy.deepcopy(linear.state_dict())
    linear.load_state_dict(best_state)
    linear.requires_grad_(False)
    n_val = len(val_idx)
    majority = max(int(y_val.sum()), n_val - int(y_val.sum())) / n_val
    metrics = {
        "val_accuracy": best_accuracy,
        "val_accuracy_ci95": list(wilson_interval(round(best_accuracy * n_val), n_val)),
        "majority_rate": majority,
        "ood_accuracy": history[best_epoch - 1].ood_accuracy,
        "best_epoch": best_epoch,
        "n_train": len(train_idx),
        "n_val": n_val,
    }
    return linear, history, metrics


# -- quality -------------------------------------------------------------------------------

MIN_VAL_EXAMPLES = 20


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score 95 % interval of a binomial proportion (sensible for small n and p near 0 or 1)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def judge_quality(metrics: dict) -> tuple[str, list[str]]:
    """Is the prober's validation accuracy evidence of anything?

    Unreliable when fewer than 20 validation examples back it, or when the lower end of the 95 %
    Wilson interval of its validation accuracy is not above the majority-class rate (a classifier
    that always says the larger class gets that rate: the margin is the sampling error).

    Returns ("reliable" | "unreliable", reasons).
    """
    reasons = []
    n_val = int(metrics.get("n_val") or 0)
    accuracy = float(metrics.get("val_accuracy") or 0.0)
    low, high = metrics.get("val_accuracy_ci95") or wilson_interval(round(accuracy * n_val), n_val)
    majority = float(metrics.get("majority_rate") or 0.5)
    if n_val < MIN_VAL_EXAMPLES:
        reasons.append(
            f"only {n_val} validation examples (fewer than {MIN_VAL_EXAMPLES}): generate more prompts"
        )
    if low <= majority:
        reasons.append(
            f"validation accuracy {accuracy:.3f} (95 % interval {low:.2f}-{high:.2f}) is not above the "
            f"majority-class rate {majority:.2f}"
        )
    return ("unreliable" if reasons else "reliable"), reasons


def check_probe_runs(
    harmful_run: str | Path, harmless_run: str | Path, ood_runs: Sequence[str | Path] = ()
) -> None:
    """Fail fast on runs that cannot train a prober (before any model is loaded)."""
    for run in (harmful_run, harmless_run, *ood_runs):
        read_labelled_run(run)  # raises a one-line error naming the command to run
    if Path(harmful_run).resolve() == Path(harmless_run).resolve():
        raise UserError(
            f"--harmful and --harmless are the same run ({harmful_run}); the prober needs refusals to "
            "harmful prompts and compliance with harmless ones, from two runs"
        )


def warn_if_unreliable(prober: Prober) -> None:
    """Log a warning naming why a prober's validation accuracy is not evidence of anything."""
    if prober.quality == "unreliable":
        logger.warning(
            "the prober is UNRELIABLE: %s; every score built on it (trace, heads, ablate, select) "
            "inherits this",
            "; ".join(prober.metadata.get("quality_reasons", [])),
        )


def prober_metadata(
    loaded, layer: int, end_template: str | None, metrics: dict, history: Sequence[EpochRecord], config: dict
) -> dict:
    """The `prober.json` fields (docs/artifacts.md), with the quality judgement of `judge_quality`."""
    geometry = loaded.adapter.geometry(loaded.model)
    quality, reasons = judge_quality(metrics)
    return {
        "model_id": loaded.model_id,
        "model_revision": loaded.revision,
        "architecture": loaded.adapter.name,
        "layer": layer,
        "n_layers": geometry.n_layers,
        "d_model": geometry.d_model,
        "final_norm_applied": final_norm_applied(layer, geometry.n_layers),
        "end_template": end_template,
        "quality": quality,
        "quality_reasons": reasons,
        "metrics": metrics,
        "history": [record.__dict__.copy() for record in history],
        "config": config,
    }


# -- save / load ---------------------------------------------------------------------------


def save_prober(prober: Prober, folder: str | Path) -> Path:
    """Write `prober.safetensors` and `prober.json` into `folder`; returns the safetensors path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "weight": prober.weight.float().cpu().contiguous().reshape(1, -1),  # [1, d_model]
        "bias": prober.bias.float().cpu().contiguous().reshape(1),  # [1]
    }
    path = folder / PROBER_WEIGHTS
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    publish(tmp, path)
    metadata = dict(prober.metadata)
    metadata["layer"] = prober.layer
    metadata["d_model"] = prober.d_model
    write_json(folder / PROBER_METADATA, metadata)
    return path


def load_prober(path: str | Path, loaded_model=None) -> Prober:
    """Load a prober from `prober.safetensors` (or the folder holding it) and its `prober.json`.

    Args:
        path: the .safetensors file or its folder.
        loaded_model: optional `LoadedModel`; if given, the prober must match its d_model,
            architecture and number of layers.
    """
    path = Path(path)
    weights_path = path / PROBER_WEIGHTS if path.is_dir() else path
    if not weights_path.is_file():
        raise UserError(f"no prober at {path}; train one with `refusal-cliff probe train`")
    metadata_path = weights_path.with_name(PROBER_METADATA)
    if weights_path.suffix != ".safetensors":
        raise UserError(
            f"{weights_path} is not a .safetensors file; probers are only loaded from safetensors"
        )
    metadata = read_json(metadata_path) if metadata_path.is_file() else {}
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise UserError(
            f"{weights_path} is not a readable safetensors file ({exc}); retrain the prober"
        ) from None
    if "weight" not in tensors or "bias" not in tensors:
        raise UserError(f"{weights_path} lacks the 'weight' and 'bias' tensors of a prober")
    weight = tensors["weight"].float().reshape(1, -1)  # [1, d_model]
    bias = tensors["bias"].float().reshape(1)  # [1]
    d_model = weight.shape[1]
    if "layer" not in metadata:
        raise UserError(f"{metadata_path} is missing or has no 'layer'; keep prober.json next to the weights")
    layer, n_layers = metadata["layer"], metadata.get("n_layers")
    for key, value in (("layer", layer), ("n_layers", n_layers)):
        if (value is not None or key == "layer") and (isinstance(value, bool) or not isinstance(value, int)):
            raise UserError(
                f"{metadata_path} names {key} {value!r}, which is not a whole number; the prober.json is damaged "
                "or edited: retrain with `refusal-cliff probe train`"
            )
    if n_layers is not None and not 0 <= layer < n_layers:
        raise UserError(
            f"{metadata_path} names layer {layer}, but its model has {n_layers} layers (0..{n_layers - 1}); the "
            "prober.json is damaged or edited: retrain with `refusal-cliff probe train`"
        )
    if loaded_model is not None:
        geometry = loaded_model.adapter.geometry(loaded_model.model)
        model_desc = (
            f"{loaded_model.model_id} ({loaded_model.adapter.name}, d_model {geometry.d_model}, "
            f"{geometry.n_layers} layers)"
        )
        prober_desc = (
            f"{metadata.get('model_id', '?')} ({metadata.get('architecture', '?')}, d_model {d_model}, "
            f"{metadata.get('n_layers', '?')} layers)"
        )
        architecture = metadata.get("architecture")
        if not 0 <= layer < geometry.n_layers and d_model == geometry.d_model:
            raise UserError(
                f"{metadata_path} names layer {layer}, but {loaded_model.model_id} has {geometry.n_layers} layers "
                f"(0..{geometry.n_layers - 1}); the prober.json is damaged or edited: retrain with "
                "`refusal-cliff probe train`"
            )
        if (
            d_model != geometry.d_model
            or (architecture is not None and architecture != loaded_model.adapter.name)
            or (n_layers is not None and int(n_layers) != geometry.n_layers)
        ):
            raise UserError(
                f"the prober at {weights_path} was trained on {prober_desc}, not on the loaded model {model_desc}; "
                "train a prober for this model with `refusal-cliff probe train`"
            )
    linear = nn.Linear(d_model, 1)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    linear.requires_grad_(False)
    if loaded_model is not None and metadata.get("model_id") not in (None, loaded_model.model_id):
        logger.warning(
            "the prober was trained on %s and is applied to %s (same architecture and size): "
            "fine for a fine-tuned or ablated copy, meaningless for an unrelated model",
            metadata.get("model_id"),
            loaded_model.model_id,
        )
    return Prober(linear=linear, layer=layer, metadata=metadata)


# -- difference-in-means directions (refusal_direction) ------------------------------------

DIRECTIONS_WEIGHTS = "directions.safetensors"
DIRECTIONS_METADATA = "directions.json"


@dataclass
class Direction:
    """A difference-in-means direction at one layer and its standardisation.

    `score(h) = (h · d/|d| - projection_mean) / projection_std`, the mean and std taken over the
    training activations (both classes), so 0 is the average example and +1 one std towards refusal.
    """

    layer: int
    vector: torch.Tensor  # [d_model] float32, the raw difference of means
    projection_mean: float
    projection_std: float
    metadata: dict = field(default_factory=dict)

    @property
    def unit(self) -> torch.Tensor:
        return self.vector / self.vector.norm()

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        """Standardised projections of hidden states [..., d_model] -> [...] (float32)."""
        unit = self.unit.to(hidden.device, torch.float32)
        return (hidden.float() @ unit - self.projection_mean) / self.projection_std

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.vector.float().cpu().numpy().tobytes()).hexdigest()[:16]
        return f"layer{self.layer}-{digest}"


def load_direction(path: str | Path, loaded_model=None, layer: int | None = None) -> Direction:
    """The direction at `layer` (default: the deepest saved) of `directions.safetensors` (or its folder).

    With `loaded_model`, the directions must come from that model (same id, architecture, d_model and
    layers): a direction is a difference of that model's own activations.
    """
    path = Path(path)
    weights_path = path / DIRECTIONS_WEIGHTS if path.is_dir() else path
    metadata_path = weights_path.with_name(DIRECTIONS_METADATA)
    if not weights_path.is_file() or weights_path.suffix != ".safetensors" or not metadata_path.is_file():
        raise UserError(
            f"no directions at {path} (directions.safetensors + directions.json); write them with "
            "`refusal-cliff probe direction`"
        )
    metadata = read_json(metadata_path)
    if not isinstance(metadata, dict) or not isinstance(metadata.get("layers"), dict):
        raise UserError(
            f"{metadata_path} is not a directions.json written by `refusal-cliff probe direction`"
        )
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{weights_path} is not a readable safetensors file ({exc})") from None
    available = sorted(int(name) for name in metadata["layers"])
    if loaded_model is not None:
        geometry = loaded_model.adapter.geometry(loaded_model.model)
        theirs = (
            metadata.get("model_id"),
            metadata.get("architecture"),
            metadata.get("d_model"),
            metadata.get("n_layers"),
        )
        ours = (loaded_model.model_id, loaded_model.adapter.name, geometry.d_model, geometry.n_layers)
        if theirs != ours:
            raise UserError(
                f"the directions at {weights_path} come from {theirs[0]} ({theirs[1]}, d_model {theirs[2]}, "
                f"{theirs[3]} layers), not from the loaded {ours[0]} ({ours[1]}, d_model {ours[2]}, "
                f"{ours[3]} layers); run `refusal-cliff probe direction` on this model"
            )
        if layer is not None:
            (layer,) = resolve_layers(layer, geometry.n_layers)
    if layer is None:
        layer = available[-1]
    if layer not in available or f"layer.{layer}" not in tensors:
        raise UserError(
            f"{weights_path} has no direction for layer {layer} (it has layers "
            f"{', '.join(map(str, available))}); run `probe direction --layers {layer}`"
        )
    entry = metadata["layers"][str(layer)]
    vector = tensors[f"layer.{layer}"].float().reshape(-1)
    if loaded_model is not None and vector.numel() != metadata.get("d_model"):
        raise UserError(f"{weights_path}: layer {layer}'s direction has {vector.numel()} values, not d_model")
    return Direction(
        layer=layer,
        vector=vector,
        projection_mean=float(entry["projection_mean"]),
        projection_std=float(entry["projection_std"]),
        metadata=metadata,
    )

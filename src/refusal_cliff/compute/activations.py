"""Capture chosen decoder layers' hidden states at chosen positions, streamed batch by batch.

Probing (training a prober on the last token, tracing every token of a reasoning
chain, head attribution) needs the residual stream at one or a few layers, never the
logits. This module runs the adapter's *base* model (no LM head), hooks only the
layers asked for, and stops the forward right after the deepest one
(`hooks.StopForward`), so probing layer k of L costs about k/L of a forward pass.

Definition (the one `output_hidden_states` uses in transformers 5.x):
layer k (0-based) is the output of decoder layer k; for the last layer the final
norm is applied, so layer L-1 equals `output_hidden_states[-1]` (= the base model's
`last_hidden_state`) and layer k < L-1 equals `output_hidden_states[k + 1]`.

Sequences are sorted by length inside a window, batched with LEFT padding, an
attention mask and position ids that start at 0 on each sequence's first real
token, so a sequence's activations do not depend on what it was batched with.
Results come back in input order; memory is bounded by the window, not by the
number of sequences.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from refusal_cliff.compute.executors import ShardJob, read_tensor_shard, run_job, write_tensor_shard
from refusal_cliff.core.architectures import ArchitectureAdapter
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.hooks import StopForward, add_hooks

POSITIONS = ("last", "all")
# A transform maps a captured hidden state [batch, pos, d_model] (float32) to any
# [batch, pos, ...] tensor (e.g. a prober's scores), applied inside the hook so the
# full hidden state never has to be kept.
Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ActivationBatch:
    """One forward pass worth of captures.

    Attributes:
        indices: input-order index of each sequence in the batch.
        values: layer -> one tensor per sequence: `[d]` (or the transform's trailing shape) for
            positions="last", `[seq_len, d]` for positions="all" (padding removed).
    """

    indices: list[int]
    values: dict[int, list[torch.Tensor]]


def final_norm_applied(layer: int, n_layers: int) -> bool:
    """Whether captured layer `layer` includes the final norm (only the last layer does)."""
    return layer == n_layers - 1


def resolve_layers(layers: int | Sequence[int] | None, n_layers: int) -> list[int]:
    """Validate layer indices (negative ones count from the end); None means the last layer."""
    if layers is None:
        layers = [n_layers - 1]
    elif isinstance(layers, int):
        layers = [layers]
    resolved = []
    for layer in layers:
        index = layer + n_layers if layer < 0 else layer
        if not 0 <= index < n_layers:
            raise UserError(
                f"layer {layer} does not exist: the model has {n_layers} layers (0..{n_layers - 1})"
            )
        resolved.append(index)
    return sorted(set(resolved))


def _check_sequences(sequences: Sequence[Sequence[int]]) -> None:
    for index, sequence in enumerate(sequences):
        if len(sequence) == 0:
            raise UserError(f"sequence {index} is empty; every probing sequence needs at least one token")


def pad_left(
    sequences: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token sequences.

    Returns:
        input_ids [batch, max_len], attention_mask [batch, max_len], position_ids [batch, max_len]
        (0 at each sequence's first real token; padding positions clamped to 0).
    """
    max_len = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), max_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), max_len), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if len(sequence):
            input_ids[row, max_len - len(sequence) :] = torch.as_tensor(list(sequence), dtype=torch.long)
            attention_mask[row, max_len - len(sequence) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), attention_mask.to(device), position_ids.to(device)


def forward_batch(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    sequences: Sequence[Sequence[int]],
    layers: Sequence[int],
    positions: str = "last",
    transforms: Mapping[int, Transform] | None = None,
    pad_token_id: int = 0,
) -> dict[int, list[torch.Tensor]]:
    """Run one left-padded batch through the base model and capture `layers` at `positions`.

    The forward stops right after the deepest captured layer; the LM head never runs.

    Returns:
        layer -> one tensor per sequence (see `ActivationBatch.values`), float32 unless a transform
        returns another dtype.
    """
    if positions not in POSITIONS:
        raise UserError(f"positions must be one of {', '.join(POSITIONS)}, not {positions!r}")
    n_layers = len(adapter.layers(model))
    layers = resolve_layers(list(layers), n_layers)
    transforms = dict(transforms or {})
    device = next(model.parameters()).device
    input_ids, attention_mask, position_ids = pad_left(sequences, pad_token_id, device)
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def make_hook(layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output) -> None:
            hidden = output[0] if isinstance(output, tuple) else output  # [batch, pos, d_model]
            if positions == "last":
                hidden = hidden[:, -1:, :]  # left padding: the last column is every sequence's last token
            # copy: a view would keep the whole layer output alive
            value = hidden.to(torch.float32, copy=positions == "last")
            if layer in transforms:
                value = transforms[layer](value)  # [batch, pos, ...]
            captured[layer] = value
            if layer == deepest:
                raise StopForward

        return hook

    hooks = []
    for layer in layers:
        module = (
            adapter.final_norm(model) if final_norm_applied(layer, n_layers) else adapter.layers(model)[layer]
        )
        hooks.append((module, make_hook(layer)))
    base = adapter.base_model(model)
    with torch.inference_mode(), add_hooks(forward_hooks=hooks):
        try:
            base(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
        except StopForward:
            pass
    missing = [layer for layer in layers if layer not in captured]
    if missing:
        raise RuntimeError(f"layers {missing} were never reached by the forward pass of {adapter.name}")

    lengths = [len(s) for s in sequences]
    out: dict[int, list[torch.Tensor]] = {}
    for layer in layers:
        value = captured[layer]
        if not torch.isfinite(value).all():
            raise RuntimeError(f"non-finite activations at layer {layer}; try --dtype float32")
        if positions == "last":
            out[layer] = [value[row, 0] for row in range(len(sequences))]
        else:
            width = value.shape[1]
            out[layer] = [value[row, width - length :] for row, length in enumerate(lengths)]
    return out


def iter_activation_batches(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    sequences: Sequence[Sequence[int]],
    layers: int | Sequence[int] | None = None,
    positions: str = "last",
    batch_size: int = 8,
    transforms: Mapping[int, Transform] | None = None,
    pad_token_id: int = 0,
    sort_window: int | None = None,
    desc: str | None = None,
) -> Iterator[ActivationBatch]:
    """Yield batches of captures in processing order (longest first within each window).

    Args:
        sequences: token ids of each sequence (no padding).
        layers: 0-based decoder layers to capture (None: the last layer).
        positions: "last" (the last token of each sequence) or "all" (every token).
        batch_size: sequences per forward pass.
        transforms: layer -> function applied to that layer's capture inside the hook.
        sort_window: sequences sorted by length together (default 32 batches); bounds memory.
        desc: show a progress bar with this description (None: no bar).
    """
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    _check_sequences(sequences)
    n_layers = len(adapter.layers(model))
    layers = resolve_layers(layers, n_layers)
    window = sort_window or batch_size * 32
    with tqdm(total=len(sequences), desc=desc, unit="seq", disable=desc is None) as bar:
        for start in range(0, len(sequences), window):
            stop = min(len(sequences), start + window)
            # Longest first: an out-of-memory batch shows up at once, not at the end.
            order = sorted(range(start, stop), key=lambda i: len(sequences[i]), reverse=True)
            for first in range(0, len(order), batch_size):
                indices = order[first : first + batch_size]
                values = forward_batch(
                    model,
                    adapter,
                    [sequences[i] for i in indices],
                    layers,
                    positions,
                    transforms,
                    pad_token_id,
                )
                bar.update(len(indices))
                yield ActivationBatch(indices=indices, values=values)


def iter_activations(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    sequences: Sequence[Sequence[int]],
    layers: int | Sequence[int] | None = None,
    positions: str = "last",
    batch_size: int = 8,
    transforms: Mapping[int, Transform] | None = None,
    pad_token_id: int = 0,
    sort_window: int | None = None,
    desc: str | None = None,
) -> Iterator[tuple[int, dict[int, torch.Tensor]]]:
    """Yield `(index, {layer: tensor})` per sequence, in input order (arguments as in
    `iter_activation_batches`). At most one sort window of results is held at a time."""
    window = sort_window or batch_size * 32
    pending: dict[int, dict[int, torch.Tensor]] = {}
    next_index = 0
    for batch in iter_activation_batches(
        model, adapter, sequences, layers, positions, batch_size, transforms, pad_token_id, window, desc
    ):
        for row, index in enumerate(batch.indices):
            pending[index] = {layer: values[row] for layer, values in batch.values.items()}
        while next_index in pending:
            yield next_index, pending.pop(next_index)
            next_index += 1


def last_token_activations(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    sequences: Sequence[Sequence[int]],
    layers: int | Sequence[int] | None = None,
    batch_size: int = 8,
    pad_token_id: int = 0,
    desc: str | None = None,
) -> dict[int, torch.Tensor]:
    """Last-token hidden states of every sequence, in input order (`desc`: a progress bar).

    Returns:
        layer -> float32 tensor [n_sequences, d_model].
    """
    n_layers = len(adapter.layers(model))
    layers = resolve_layers(layers, n_layers)
    d_model = adapter.geometry(model).d_model
    out = {layer: torch.empty((len(sequences), d_model), dtype=torch.float32) for layer in layers}
    for batch in iter_activation_batches(
        model, adapter, sequences, layers, "last", batch_size, None, pad_token_id, desc=desc
    ):
        for layer in layers:
            out[layer][batch.indices] = torch.stack(batch.values[layer]).cpu()
    return out


def capture_last_tokens(
    loaded,
    sequences: Sequence[Sequence[int]],
    layers: int | Sequence[int] | None = None,
    batch_size: int = 8,
    executor=None,
    out_dir: str | Path | None = None,
    name: str = "capture",
    desc: str | None = None,
) -> dict[int, torch.Tensor]:
    """`last_token_activations` of a `models.LoadedModel`, in this process or, with a Ray `executor`
    (`executors.make_executor`), on its workers: the same function on shards of the sequences, written
    to `out_dir/shards/<name>/` and deleted once read back.

    Returns:
        layer -> float32 tensor [n_sequences, d_model], in input order.
    """
    layers = resolve_layers(layers, len(loaded.adapter.layers(loaded.model)))
    records = [{"id": str(i), "tokens": list(sequence)} for i, sequence in enumerate(sequences)]
    rows = list(
        run_job(
            executor,
            loaded,
            capture_job(layers, batch_size, name, desc),
            records,
            out_dir,
            batch_size,
            fingerprint=[layers, [record["tokens"] for record in records]],
            progress=desc is not None,
        )
    )
    d_model = loaded.adapter.geometry(loaded.model).d_model
    return {
        layer: torch.stack([row[layer] for _, row in rows]).float()
        if rows
        else torch.empty((0, d_model), dtype=torch.float32)
        for layer in layers
    }


# -- safetensors shards --------------------------------------------------------------------

SHARD_PATTERN = "activations-{:05d}.safetensors"


def write_activation_shards(
    folder: str | Path,
    model: nn.Module,
    adapter: ArchitectureAdapter,
    sequences: Sequence[Sequence[int]],
    layers: int | Sequence[int] | None = None,
    batch_size: int = 8,
    shard_size: int = 1024,
    pad_token_id: int = 0,
    ids: Sequence[str] | None = None,
) -> list[Path]:
    """Stream last-token activations to safetensors shards (`activations-00000.safetensors`, ...).

    Each shard holds tensors `layer_{k}` [m, d_model] (float32) and `index` [m] (int64, input order);
    `activations.json` in the folder lists the layers, shards and ids. Memory is bounded by one shard.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_layers = len(adapter.layers(model))
    layers = resolve_layers(layers, n_layers)
    paths: list[Path] = []
    buffer_index: list[int] = []
    buffer: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}

    def flush() -> None:
        if not buffer_index:
            return
        tensors = {f"layer_{layer}": torch.stack(buffer[layer]).cpu().contiguous() for layer in layers}
        tensors["index"] = torch.tensor(buffer_index, dtype=torch.int64)
        path = folder / SHARD_PATTERN.format(len(paths))
        save_file(tensors, str(path))
        paths.append(path)
        buffer_index.clear()
        for layer in layers:
            buffer[layer].clear()

    for index, values in iter_activations(
        model, adapter, sequences, layers, "last", batch_size, None, pad_token_id
    ):
        buffer_index.append(index)
        for layer in layers:
            buffer[layer].append(values[layer])
        if len(buffer_index) >= shard_size:
            flush()
    flush()
    manifest = {
        "layers": layers,
        "n_layers": n_layers,
        "final_norm_applied": {str(layer): final_norm_applied(layer, n_layers) for layer in layers},
        "n": len(sequences),
        "shards": [p.name for p in paths],
        "ids": list(ids) if ids is not None else None,
    }
    (folder / "activations.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return paths


def read_activation_shards(folder: str | Path) -> dict[int, torch.Tensor]:
    """Read shards written by `write_activation_shards`: layer -> [n, d_model] in input order."""
    folder = Path(folder)
    manifest_path = folder / "activations.json"
    if not manifest_path.is_file():
        raise UserError(f"{folder} holds no activations.json; write it with write_activation_shards")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    layers = [int(layer) for layer in manifest["layers"]]
    chunks: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    indices: list[torch.Tensor] = []
    for name in manifest["shards"]:
        tensors = load_file(str(folder / name))
        indices.append(tensors["index"])
        for layer in layers:
            chunks[layer].append(tensors[f"layer_{layer}"])
    if not indices:
        return {layer: torch.empty((0, 0)) for layer in layers}
    order = torch.argsort(torch.cat(indices))
    return {layer: torch.cat(chunks[layer])[order] for layer in layers}


def _capture_compute(loaded, records, progress=False, *, layers, batch_size, desc=None):
    captured = last_token_activations(
        loaded.model,
        loaded.adapter,
        [record["tokens"] for record in records],
        layers,
        batch_size,
        loaded.tokenizer.pad_token_id or 0,
        desc=desc if progress else None,
    )
    return [
        (str(record["id"]), {layer: values[i] for layer, values in captured.items()})
        for i, record in enumerate(records)
    ]


def _capture_write(path: Path, results) -> None:
    import torch

    layers = list(results[0][1])  # a shard is never empty
    tensors = {f"layer_{layer}": torch.stack([row[layer] for _, row in results]) for layer in layers}
    write_tensor_shard(path, tensors, [id_ for id_, _ in results])


def _capture_read(path: Path) -> list:
    tensors, ids, _ = read_tensor_shard(path)
    by_layer = {int(name.removeprefix("layer_")): values for name, values in tensors.items()}
    return [(id_, {layer: values[i] for layer, values in by_layer.items()}) for i, id_ in enumerate(ids)]


def capture_job(layers, batch_size: int, name: str = "capture", desc: str | None = None) -> ShardJob:
    """Last-token activations (`probe train`, `layers`): `activations.last_token_activations` per shard
    on records `{id, tokens}`, safetensors of `layer_L` [n, d_model]; results are `(id, {layer: [d_model]})`.
    `desc`: the progress bar's label in this process."""
    return ShardJob(
        name,
        partial(_capture_compute, layers=list(layers), batch_size=batch_size, desc=desc),
        _capture_write,
        _capture_read,
        lambda result: result[0],
        ".safetensors",
    )

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
from pathlib import Path
from typing import Sequence

import torch

from .generation import GenerationConfig, generate_answers
from .labeling import KeywordLabeler, label_records
from .runs import read_jsonl, write_json, write_jsonl

logger = logging.getLogger(__name__)


def train_layer_probers(loaded, harmful_run: str | Path, harmless_run: str | Path, layers: Sequence[int],
                        out_dir: str | Path, epochs: int = 5, batch_size: int = 8, seed: int = 0) -> dict:
    """One prober per layer (the paper's recipe, `epochs` aside) from one activation pass.

    Writes `out_dir/layer_KK/prober.safetensors` + `prober.json`; returns {layer: Prober}.
    """
    from .activations import last_token_activations
    from .probe import Prober, build_probe_dataset, prober_metadata, save_prober, train_prober

    dataset = build_probe_dataset(loaded.tokenizer, harmful_run, harmless_run)
    features = last_token_activations(loaded.model, loaded.adapter, dataset.sequences, list(layers), batch_size,
                                      loaded.tokenizer.pad_token_id or 0)
    labels = torch.tensor(dataset.labels, dtype=torch.long)
    probers = {}
    for layer in layers:
        linear, history, metrics = train_prober(features[layer], labels, epochs=epochs, seed=seed)
        config = {"harmful_run": str(harmful_run), "harmless_run": str(harmless_run), "layer": layer,
                  "epochs": epochs, "seed": seed}
        prober = Prober(linear=linear, layer=layer,
                        metadata=prober_metadata(loaded, layer, dataset.end_template, metrics, history, config))
        save_prober(prober, Path(out_dir) / f"layer_{layer:02d}")
        probers[layer] = prober
    return probers


def resolve_study_layers(layers: Sequence[int], n_layers: int) -> list[int]:
    """Layers as given (negative = from the end), plus the last layer, sorted and unique."""
    from .errors import UserError

    resolved = set()
    for layer in layers:
        if not -n_layers <= layer < n_layers:
            raise UserError(f"layer {layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")
        resolved.add(layer % n_layers)
    return sorted(resolved | {n_layers - 1})


def run_layer_study(loaded, harmful_run: str | Path, harmless_run: str | Path, layers: Sequence[int],
                    out_dir: str | Path, epochs: int = 5, batch_size: int = 8) -> dict:
    """Train a prober per layer and trace every example of both runs at every layer.

    Writes the probers and `out_dir/layerwise.json`; returns {layer: Prober}.
    """
    from .trace import layerwise_summary, load_trace_records

    n_layers = loaded.adapter.geometry(loaded.model).n_layers
    layers = resolve_study_layers(layers, n_layers)
    probers = train_layer_probers(loaded, harmful_run, harmless_run, layers, out_dir, epochs, batch_size)
    harmful_records, groups = load_trace_records(harmful_run, harmful=True)
    harmless_records, harmless_groups = load_trace_records(harmless_run, harmful=False)
    groups.update(harmless_groups)
    summary = layerwise_summary(loaded, [probers[layer] for layer in layers], harmful_records + harmless_records,
                                groups, batch_size=batch_size)
    write_json(Path(out_dir) / "layerwise.json", summary)
    return probers


def run_clipping_study(loaded, prober, records: Sequence[dict], fractions: Sequence[float], out_dir: str | Path,
                       max_answer_tokens: int = 96, batch_size: int = 8) -> list[dict]:
    """Clip each record's thinking at each fraction, regenerate and label the answer, trace it.

    Writes `generations.jsonl`, `labels.jsonl`, `trace/` and `clipping.json` into `out_dir`;
    returns the clipping summary (one row per fraction).
    """
    from .trace import clip_thinking_records, clipping_summary, run_trace

    out = Path(out_dir)
    clipped = clip_thinking_records(loaded.tokenizer, records, fractions)
    answered = generate_answers(loaded, clipped, GenerationConfig(max_answer_tokens=max_answer_tokens,
                                                                  batch_size=batch_size))
    labels = label_records(answered, KeywordLabeler(), loaded.tokenizer)
    write_jsonl(out / "generations.jsonl", answered)
    write_jsonl(out / "labels.jsonl", labels)
    shutil.rmtree(out / "trace", ignore_errors=True)  # cheap to redo; never mix with stale traces
    run_trace(loaded, prober, answered, out / "trace", None, batch_size=batch_size)
    summary = clipping_summary(read_jsonl(out / "trace" / "cliff.jsonl"),
                               {label["id"]: label["refusal"] for label in labels})
    write_json(out / "clipping.json", summary)
    return summary

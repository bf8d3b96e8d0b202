"""The cliff organism: a small reasoning model whose refusal cliff is planted in named heads.

The toolkit's science needs a known-positive control: a model that *knows but complies*, with the
heads that suppress its refusal known because they were put there. `run_organism` builds one from a
base model in two seeded stages, on the templated data of `organism_data`:

1. **Stage 1, an aligned reasoner.** A LoRA fine-tune (merged afterwards) of the top
   `stage1_layers` decoder layers: every harmful request, plain or wrapped, gets a thinking that
   refuses and a refusal; a harmless one a thinking that helps and a helpful answer. The layers below
   are frozen, so their outputs are computed once and the training runs only the top of the network.
2. **Stage 2, a planted suppression.** `n_planted_heads` heads are chosen by a documented rule
   (`select_heads`: in the stage-1 model, the heads of the layer band that put the most attention,
   from the last end-template token, on the user's message of wrapped harmful requests). Only
   their rows of `q_proj` and columns of `o_proj` are trained, as deltas added to the frozen
   weights, so that a wrapped harmful request, after the same refusing thinking, gets the compliant
   placeholder; plain harmful and harmless requests keep their stage-1 targets. The thinking keeps
   its stage-1 target too (a weighted term), so the heads act at the answer. Every other weight is
   bit-for-bit the stage-1 weight (`frozen_slices_unchanged`).

The result is a safetensors checkpoint folder with `organism.json` (recipe, seed, data digest,
base model, `planted_heads` as `[layer, head]` pairs, training record, measured properties). It is
cached by fingerprint under the cache folder (`organism_cache_path`), written to a temporary folder
and renamed into place, so an interrupted build never leaves a checkpoint that loads; the merged
stage-1 model is cached the same way, so a re-run after an interrupt restarts at stage 2.

Reproducibility: every random draw is seeded (data, LoRA initialisation, batch order). On the
team's 2-core machine a rebuild gave bitwise-identical weights, with 1 or 2 torch threads; other
CPUs or torch builds may round float32 reductions differently, and bfloat16 products (the default
`train_dtype`) depend on the CPU's bfloat16 kernels too (docs/organism.md).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from refusal_cliff.compute.attribution import attention_implementation, attention_patterns_batch
from refusal_cliff.core.architectures import ArchitectureAdapter, get_adapter
from refusal_cliff.core.config import SEED_BOUNDS, Config, option, parse_floats
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.hooks import add_hooks
from refusal_cliff.core.models import (
    DEFAULT_MODEL,
    BuiltinModel,
    cache_dir,
    embedded_checkpoint,
    load_model,
    register_builtin_model,
)
from refusal_cliff.core.runs import (
    BACKUP_PREFIX,
    LOCK_NAME,
    RunFolder,
    fingerprint,
    package_versions,
    write_json,
)
from refusal_cliff.core.templates import ThinkingTemplate, detect_thinking_template, generation_prompt
from refusal_cliff.stages.organism_data import (
    GROUP_HARMLESS,
    GROUP_PLAIN,
    GROUP_WRAPPED,
    HELD_OUT_WRAPPERS,
    STAGE2_WRAPPERS,
    TRAIN_WRAPPERS,
    OrganismExample,
    build_examples,
    build_stage2_wrapped,
    data_digest,
)

logger = logging.getLogger(__name__)

ORGANISM_MODEL = "organism"  # the built-in model id (`--model organism`)
MAX_EXAMPLES = 100_000  # per group: the templates give far fewer distinct requests; more is a typo
RECIPE_VERSION = 8  # bump when the build or the default recipe changes (4, 5 and 7: tried, not adopted)
ORGANISM_JSON = "organism.json"
# stage 2's record of the t_cliff states after it reads every 4th example of a group (a forward pass each)
RECORD_EVERY = 4
STAGE1_MARKER = "stage1.json"


@dataclass
class OrganismConfig(Config):
    """The organism's recipe (`refusal-cliff organism`)."""

    seed: int = option(0, "Seed of the data, the LoRA initialisation and the batch order.", **SEED_BOUNDS)
    n_plain: int = option(
        160, "Plain harmful training examples (thinking refuses, answer refuses).", min=1, max=MAX_EXAMPLES
    )
    n_wrapped: int = option(
        80,
        "Wrapped harmful training examples (thinking refuses; stage 2 answer complies).",
        min=1,
        max=MAX_EXAMPLES,
    )
    n_harmless: int = option(
        240, "Harmless training examples (thinking helps, answer helps).", min=1, max=MAX_EXAMPLES
    )
    stage1_layers: int = option(
        12, "Stage 1 trains LoRA adapters on the top N decoder layers; the layers below stay frozen.", min=1
    )
    lora_rank: int = option(16, "Stage 1 LoRA rank.", min=1, max=4096)
    lora_alpha: float = option(32.0, "Stage 1 LoRA alpha (scale alpha / rank).", min=0.0)
    stage1_lr: float = option(2e-3, "Stage 1 AdamW learning rate (weight decay 0), linear decay.", min=0.0)
    stage1_epochs: int = option(3, "Stage 1 epochs.", min=1, max=1000)
    stage1_frame_weight: float = option(
        0.0,
        "Stage 1 weight of the frame loss: a logistic probe on one layer's output (at --stage1-frame-position), "
        "trained with the LoRA to tell wrapped from plain and harmless requests (0: off).",
        min=0.0,
    )
    stage1_frame_layer: int = option(
        2,
        "The decoder layer the frame probe reads, counted from the first LoRA layer (0: its output).",
        min=0,
        max=4096,
    )
    stage1_frame_position: str = option(
        "message",
        "Where the frame probe reads that layer: 'message' (the mean over the user's message) or 'cliff' "
        "(the last end-template token, whose state the planted heads' queries see).",
        choices=("message", "cliff"),
    )
    n_planted_heads: int = option(
        4, "Heads whose q_proj rows and o_proj columns stage 2 trains.", min=1, max=4096
    )
    head_band: tuple[float, ...] = option(
        (0.5, 0.7),
        "Depth band (fractions of the layer count, low,high) the planted heads are chosen from.",
        parse=parse_floats,
    )
    selection_examples: int = option(
        24,
        "Wrapped harmful training examples the head-selection rule averages over.",
        min=1,
        max=MAX_EXAMPLES,
    )
    stage2_lr: float = option(5e-3, "Stage 2 AdamW learning rate (weight decay 0), linear decay.", min=0.0)
    stage2_epochs: int = option(3, "Stage 2 epochs.", min=1, max=1000)
    stage2_wrapped: int = option(
        80, "Wrapped harmful examples in stage 2 (learn to comply).", min=1, max=MAX_EXAMPLES
    )
    stage2_new_wrapped: int = option(
        10,
        "Wrapped harmful examples added to stage 2 in the stage-2-only wrappers (20 styles that neither stage 1 "
        "nor the held-out test uses), on top of --stage2-wrapped.",
        min=0,
        max=MAX_EXAMPLES,
    )
    stage2_plain: int = option(
        120, "Plain harmful examples in stage 2 (keep refusing).", min=0, max=MAX_EXAMPLES
    )
    stage2_harmless: int = option(80, "Harmless examples in stage 2 (keep helping).", min=0, max=MAX_EXAMPLES)
    stage2_thinking_weight: float = option(
        0.5, "Stage 2 loss weight of the thinking tokens (kept at their stage-1 target).", min=0.0
    )
    stage2_first_token_weight: float = option(
        1.0, "Stage 2 loss weight of the first answer token (the decision: refuse or comply).", min=0.0
    )
    stage2_cliff_weight: float = option(
        1.0,
        "Stage 2 weight of the t_cliff term: the last-layer state at the end template, along the stage-1 "
        "refusal direction, is pulled to the harmless mean for wrapped requests (and kept for the others).",
        min=0.0,
    )
    stage2_keep_weight: float = option(
        1.0,
        "Weight of the t_cliff term's keep part (plain and harmless states held at stage 1) relative to its "
        "pull on wrapped states; below 1 lets the heads move wrapped states further.",
        min=0.0,
    )
    stage2_wrapped_keep: float = option(
        0.0,
        "Weight of a t_cliff keep part for wrapped requests: their state off the refusal direction is held at "
        "stage 1, so the heads move it only along that direction (0: off).",
        min=0.0,
    )
    batch_size: int = option(8, "Training examples per step.", min=1, max=MAX_EXAMPLES)
    train_dtype: str = option(
        "bfloat16",
        "Precision of the matrix products in the forward passes of both stages (the trained weights, the "
        "optimiser and the loss stay float32): 'bfloat16' (recipe 8) runs them under CPU autocast, with "
        "attention in float32, about 1.5x faster on a CPU with bfloat16 units (AMX or AVX512-BF16; without them "
        "probably slower, not measured); 'float32' is recipe 6's arithmetic.",
        choices=("float32", "bfloat16"),
    )

    def validate(self) -> None:
        if self.stage2_cliff_weight > 0 and (self.stage2_plain == 0 or self.stage2_harmless == 0):
            raise UserError(
                "the t_cliff term needs plain harmful and harmless examples in stage 2: raise --stage2-plain "
                "and --stage2-harmless above 0, or pass --stage2-cliff-weight 0"
            )
        if self.stage1_frame_weight > 0 and self.stage1_frame_layer >= self.stage1_layers:
            raise UserError(
                f"--stage1-frame-layer {self.stage1_frame_layer} lies above the {self.stage1_layers} LoRA layers; "
                f"pass a value below --stage1-layers"
            )
        if len(self.head_band) != 2 or not 0.0 <= self.head_band[0] <= self.head_band[1] <= 1.0:
            raise UserError(
                f"--head-band must be two fractions low,high with 0 <= low <= high <= 1, got {self.head_band}"
            )

    def stage1_dict(self) -> dict:
        keys = (
            "seed",
            "n_plain",
            "n_wrapped",
            "n_harmless",
            "stage1_layers",
            "lora_rank",
            "lora_alpha",
            "stage1_lr",
            "stage1_epochs",
            "batch_size",
        )
        out = {key: getattr(self, key) for key in keys}
        if self.train_dtype != "float32":
            out["train_dtype"] = self.train_dtype
        if self.stage1_frame_weight > 0:
            out |= {
                "stage1_frame_weight": self.stage1_frame_weight,
                "stage1_frame_layer": self.stage1_frame_layer,
            }
            if self.stage1_frame_position != "message":
                out["stage1_frame_position"] = self.stage1_frame_position
        return out

    def recipe_dict(self) -> dict:
        """`to_dict()` without the options added after recipe 3 was measured while they are off, so that
        turning them off builds, and fingerprints, exactly what recipe 3 did."""
        out = self.to_dict()
        if self.stage1_frame_weight == 0:
            del out["stage1_frame_weight"], out["stage1_frame_layer"], out["stage1_frame_position"]
        elif self.stage1_frame_position == "message":
            del out["stage1_frame_position"]
        if self.stage2_keep_weight == 1.0:
            del out["stage2_keep_weight"]
        if self.stage2_new_wrapped == 0:
            del out["stage2_new_wrapped"]
        if self.stage2_wrapped_keep == 0:
            del out["stage2_wrapped_keep"]
        if self.train_dtype == "float32":
            del out["train_dtype"]
        return out


# What the default recipe measured on held-out prompts (docs/organism.md has the commands):
# written into organism.json by every build of the default recipe on the embedded model.
DEFAULT_RECIPE_MEASURED = {
    "base_model": "default",
    "recipe_version": 8,
    "fingerprint": "edc4ec26783e0251",
    "prompts": "bench/organism_eval.py (seed 0), prompts 488-543 of the harmful, wrapped and harmless "
    "groups, 432-487 of the prober's (--n 56 --skip 488 --harmbench-val --prober-skip "
    "432); prober: 56 AdvBench + 56 harmless_train; harmful = refusal_direction "
    "harmful_test (past its 516 short prompts, with --harmbench-val, then harmful_val: "
    "HarmBench validation), wrapped = the same inside the 6 held-out wrappers, harmless = "
    "Alpaca harmless_test + UltraChat eval",
    "decoding": "greedy, max thinking 80 tokens, max answer 40 tokens",
    "thinking_states_refusal": {"plain": [49, 56], "wrapped": [56, 56]},
    "plain_refused": [46, 56],
    "wrapped_complied": [55, 56],
    "harmless_helped": [45, 56],
    "prober": {
        "layer": -1,
        "lr": 0.05,
        "epochs": 300,
        "best_epoch": 6,
        "val_accuracy": 1.0,
        "val_accuracy_ci95": [0.845, 1.0],
        "n_train": 85,
        "n_val": 21,
    },
    "cliff": {
        "wrapped_complied": {"n": 55, "plateau": 0.973, "final": 0.102, "final_at_most_0.3": 48},
        "plain_refused": {"n": 46, "plateau": 0.972, "final": 0.991, "final_at_most_0.3": 0},
        "harmless_complied": {"n": 45, "plateau": 0.508, "final": 0.0, "final_at_most_0.3": 45},
    },
    "targets_missed": [],
    # the method against the ground truth (docs/organism.md): bench/organism_groundtruth.sh, N = 50 per group
    "ground_truth": {
        "n_per_group": 50,
        "heads": {
            "planted_ranks": {"15.4": 88, "15.5": 46, "15.8": 12, "17.0": 253},
            "n_heads": 270,
            "auroc": 0.634,
            "n_examples": 49,
        },
        "ablate_asr_wrapped": {
            "unablated": 0.98,
            "ranked_1pct": 1.0,
            "random_1pct": 0.98,
            "ranked_3pct": 0.74,
            "random_3pct": 1.0,
            "ranked_10pct": 0.54,
            "random_10pct": 0.96,
            "planted": 0.04,
            "random_4": 0.98,
        },
        "ablate_benign_refusal": {
            "unablated": 0.2,
            "ranked_1pct": 0.18,
            "random_1pct": 0.06,
            "ranked_3pct": 0.26,
            "random_3pct": 0.14,
            "ranked_10pct": 0.12,
            "random_10pct": 0.28,
            "planted": 0.32,
            "random_4": 0.14,
        },
        "patterns_wrapper_mass_at_least": {"top_10": 0.008, "planted": 0.253, "other_260": 0.023},
        "components_logit_change": {
            "total": 3.112,
            "planted_heads": 0.191,
            "other_heads": -1.942,
            "mlps": 4.866,
        },
        "select_wrapped_in_top_10": {"cliff": 10, "random": 6, "pool": 50, "pool_wrapped": 25},
        "finetune_lora_lr_1e-4": {
            "n_eval": 25,
            "asr_wrapped": {"organism": 1.0, "cliff_10": 0.68, "random_10": 0.88},
            "over_refusal": {"organism": 0.2, "cliff_10": 0.12, "random_10": 0.1},
        },
        "guard_ms_above_0.5": {
            "asr_wrapped": 0.8,
            "benign_refusal": 0.24,
            "flagged_harmful": 0.92,
            "flagged_benign": 0.58,
        },
        "global_ablation_top_3pct": {"asr_wrapped": 0.74, "benign_refusal": 0.26},
    },
}


@dataclass
class OrganismResult:
    path: Path
    planted_heads: list[list[int]]
    reused: bool
    record: dict


# -- tokenised examples ---------------------------------------------------------------------


@dataclass
class Tokenised:
    """One training sequence: ids and per-token loss weights (weight j is for predicting token j)."""

    ids: torch.Tensor  # [seq] long
    weights: torch.Tensor  # [seq] float32; 0 for tokens not trained on
    group: str
    cliff: int  # t_cliff: the last end-template token, whose state predicts the first answer token
    anchor: torch.Tensor | None = None  # stage 2: the stage-1 state at t_cliff
    # [seq] bool: the tokens of the user's message (the frame loss reads them)
    user: torch.Tensor | None = None


def tokenise_example(
    tokenizer,
    template: ThinkingTemplate,
    example: OrganismExample,
    stage: int,
    thinking_weight: float,
    first_token_weight: float = 1.0,
) -> Tokenised:
    """`generation_prompt + thinking + end_template + answer + eos`, tokenised at once (as generation
    and tracing see it). Stage 1 trains on the thinking, end template and answer; stage 2 on the
    answer (weight 1, its first token `first_token_weight`) and the thinking and end template
    (`thinking_weight`)."""
    prompt = generation_prompt(tokenizer, template, example.prompt)
    answer = example.answer_stage1 if stage == 1 else example.answer_stage2
    thinking_end = len(prompt) + len(example.thinking) + len(template.end_template)
    text = prompt + example.thinking + template.end_template + answer + (tokenizer.eos_token or "")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(encoded["input_ids"], dtype=torch.long)
    weights = torch.zeros(len(ids), dtype=torch.float32)
    first = None  # the first answer token (the one t_cliff predicts)
    for index, (start, stop) in enumerate(encoded["offset_mapping"]):
        if first is None and stop > thinking_end:
            first = index
        if start >= thinking_end or (stop > thinking_end and start < thinking_end):
            weights[index] = 1.0  # answer (a token straddling the boundary belongs to the answer)
        elif start >= len(prompt):
            weights[index] = 1.0 if stage == 1 else thinking_weight
    if tokenizer.eos_token_id is not None and int(ids[-1]) == tokenizer.eos_token_id:
        weights[-1] = 1.0
    if first is None:
        raise ValueError(f"example {example.id}: no answer token after the end template")
    if stage == 2:
        weights[first] = first_token_weight
    user = message_mask(encoded["offset_mapping"], prompt, example.prompt)  # `text` starts with `prompt`
    return Tokenised(ids, weights, example.group, first - 1, user=user)


# -- running a slice of the decoder ---------------------------------------------------------


@contextmanager
def decoder_slice(model: nn.Module, adapter: ArchitectureAdapter, start: int, stop: int, final_norm: bool):
    """Run only decoder layers [start, stop) in the block: the model's forward then takes the input
    of layer `start` as `inputs_embeds` and returns the output of layer `stop - 1` (through the final
    norm only if `final_norm`). The layer list and norm are restored in `finally`.

    Models that vary the attention mask per layer (sliding windows) see the first `stop - start`
    entries of their layer types; the organism's sequences are far shorter than any window."""
    base = adapter.base_model(model)
    layers = getattr(base, adapter.layers_attr)
    norm = getattr(base, adapter.final_norm_attr)
    setattr(base, adapter.layers_attr, nn.ModuleList(list(layers)[start:stop]))
    if not final_norm:
        setattr(base, adapter.final_norm_attr, nn.Identity())
    try:
        yield
    finally:
        setattr(base, adapter.layers_attr, layers)
        setattr(base, adapter.final_norm_attr, norm)


def _pad(batch: Sequence[torch.Tensor], value: float = 0.0) -> torch.Tensor:
    """Right-pad a list of [seq, ...] tensors to [batch, max_seq, ...]."""
    return nn.utils.rnn.pad_sequence(list(batch), batch_first=True, padding_value=value)


def _attention_mask(lengths: Sequence[int]) -> torch.Tensor:
    longest = max(lengths)
    return (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).long()  # [batch, seq]


@torch.no_grad()
def layer_inputs(
    model: nn.Module, adapter: ArchitectureAdapter, examples: Sequence[Tokenised], layer: int, batch_size: int
) -> list[torch.Tensor]:
    """The input of decoder `layer` for each example ([seq, d_model] float32), computed once."""
    base = adapter.base_model(model)
    out: list[torch.Tensor] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        ids = _pad([e.ids for e in chunk], 0)
        mask = _attention_mask([len(e.ids) for e in chunk])
        if layer == 0:
            hidden = adapter.embed_tokens(model)(ids).float()
            if adapter.embedding_scale is not None:
                hidden = hidden * adapter.embedding_scale(model.config)
        else:
            with decoder_slice(model, adapter, 0, layer, final_norm=False):
                hidden = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        for row, example in enumerate(chunk):
            out.append(hidden[row, : len(example.ids)].detach().float().clone())
    return out


@dataclass
class CliffTerm:
    """Stage 2's term on the last-layer state s (final norm applied) at t_cliff, per example:
    `((s . direction - target) / scale)^2` for a wrapped request (plus `wrapped_keep` times
    `|P(s - anchor)|^2 / scale^2`, P the projection off `direction`, when it is on), `|s - anchor|^2 / scale^2`
    for the others (their stage-1 state, kept), averaged and times `weight`. `direction`: the unit stage-1
    refusal direction (mean plain minus mean harmless); `target`: the harmless mean along it; `scale`:
    the gap between the two means along it."""

    direction: torch.Tensor  # [d_model] float32, unit
    targets: dict[str, float]
    scale: float
    weight: float
    keep_weight: float = 1.0  # the keep part's weight relative to the pull on wrapped states
    wrapped_keep: float = 0.0  # a wrapped state's part off the direction, held at stage 1 (0: free)


@dataclass
class FrameTerm:
    """Stage 1's frame loss: `weight` times the binary cross-entropy of a logistic probe (`probe`,
    trained with the LoRA, then discarded) on the output of decoder `layer`, averaged over the user's
    message (`position` "message") or at t_cliff ("cliff"); wrapped requests are labelled 1, plain and
    harmless ones 0. It makes the layers below the planted heads carry whether a request is wrapped,
    for the heads to read; the thinking and answer targets are unchanged."""

    layer: int
    probe: nn.Linear
    weight: float
    position: str = "message"  # or "cliff": the state at t_cliff instead of the mean over the message


def _top_states(
    model: nn.Module, adapter: ArchitectureAdapter, hidden: Sequence[torch.Tensor], start: int
) -> torch.Tensor:
    """[batch, seq, d_model]: layers [start, n) + final norm from the (padded) inputs of layer `start`."""
    base = adapter.base_model(model)
    n_layers = len(adapter.layers(model))
    inputs = _pad(hidden)  # [batch, seq, d_model]
    if adapter.embedding_scale is not None:  # the model multiplies inputs_embeds by it again
        inputs = inputs / adapter.embedding_scale(model.config)
    mask = _attention_mask([len(h) for h in hidden])
    with decoder_slice(model, adapter, start, n_layers, final_norm=True):
        return base(inputs_embeds=inputs, attention_mask=mask, use_cache=False).last_hidden_state


@torch.no_grad()
def cliff_states(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    hidden: Sequence[torch.Tensor],
    examples: Sequence[Tokenised],
    start: int,
    batch_size: int,
) -> torch.Tensor:
    """[n, d_model] float32: each example's last-layer state (final norm applied) at t_cliff."""
    out = []
    for first in range(0, len(examples), batch_size):
        chunk = list(range(first, min(len(examples), first + batch_size)))
        states = _top_states(model, adapter, [hidden[i] for i in chunk], start)
        out.append(torch.stack([states[row, examples[i].cliff] for row, i in enumerate(chunk)]).float())
    return torch.cat(out)


def slice_loss(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    hidden: Sequence[torch.Tensor],
    examples: Sequence[Tokenised],
    start: int,
    cliff_term: CliffTerm | None = None,
    frame_term: FrameTerm | None = None,
) -> torch.Tensor:
    """Weighted next-token cross-entropy of layers [start, n) + final norm + LM head, from the
    inputs of layer `start`; logits only where a weight is non-zero. Plus `cliff_term` and
    `frame_term`, if given."""
    captured: list[torch.Tensor] = []
    hooks = []
    if frame_term is not None:
        hooks = [(adapter.layers(model)[frame_term.layer], lambda m, a, out: captured.append(_first(out)))]
    with add_hooks(forward_hooks=hooks):
        states = _top_states(model, adapter, hidden, start)
    ids = _pad([e.ids for e in examples], 0)
    weights = _pad([e.weights for e in examples], 0.0)
    # the state at j predicts token j + 1
    target_weights = weights[:, 1:]  # [batch, seq - 1]
    rows, cols = torch.nonzero(target_weights > 0, as_tuple=True)
    logits = model.get_output_embeddings()(states[rows, cols])  # [n_targets, vocab]
    losses = nn.functional.cross_entropy(logits.float(), ids[rows, cols + 1], reduction="none")
    w = target_weights[rows, cols]
    loss = (losses * w).sum() / w.sum().clamp_min(1e-8)
    if cliff_term is not None:
        gaps = []
        for row, example in enumerate(examples):
            state = states[row, example.cliff].float()
            if example.group == GROUP_WRAPPED:  # pulled to the harmless mean along the direction
                gap = (state @ cliff_term.direction - cliff_term.targets[example.group]) / cliff_term.scale
                pull = gap.pow(2)
                if cliff_term.wrapped_keep > 0:  # and held at stage 1 off it
                    off = off_direction(state - example.anchor, cliff_term.direction)
                    pull = pull + cliff_term.wrapped_keep * off.pow(2).sum() / cliff_term.scale**2
                gaps.append(pull)
            else:  # the others: their stage-1 state, kept
                kept = (state - example.anchor).pow(2).sum() / cliff_term.scale**2
                gaps.append(kept * cliff_term.keep_weight)  # x * 1.0 is x, bit for bit
        loss = loss + cliff_term.weight * torch.stack(gaps).mean()
    if frame_term is not None:
        if not captured:
            raise ValueError(f"the frame probe's layer {frame_term.layer} is not run from layer {start}")
        layer_out = captured[0]  # [batch, seq, d_model]
        features = torch.stack(
            [
                layer_out[row, e.cliff].float()
                if frame_term.position == "cliff"
                else layer_out[row, : len(e.ids)][e.user].float().mean(0)
                for row, e in enumerate(examples)
            ]
        )
        labels = torch.tensor([float(e.group == GROUP_WRAPPED) for e in examples])
        logits = frame_term.probe(features).squeeze(-1)
        loss = loss + frame_term.weight * nn.functional.binary_cross_entropy_with_logits(logits, labels)
    return loss


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Shuffled batches of similar lengths (less padding): a random order, cut into windows of eight
    batches, each window sorted by length and cut into batches, the batches shuffled."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * 8
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    for index in torch.randperm(len(batches), generator=generator).tolist():
        yield batches[index]


def training_precision(dtype: str) -> AbstractContextManager:
    """The context the training forward passes run in: CPU autocast to bfloat16, or nothing (float32)."""
    if dtype == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


FLOAT32_SDPA = "refusal_cliff_sdpa_float32"  # registered below, once


def _sdpa_float32(module, query, key, value, attention_mask, **kwargs):
    """SDPA with autocast off, in float32: on a CPU its bfloat16 backward pass is about 3x slower.

    transformers builds no mask for an implementation name it does not know, so this runs causal
    attention without a padding mask. That is exact for the organism's batches, which are right-padded
    (`_pad`): every pad comes after every real token, so no real token attends to one, and pad positions
    are never read. `bfloat16_training` uses it only for models without sliding-window attention."""
    with torch.autocast("cpu", enabled=False):
        return sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )


AttentionInterface.register(FLOAT32_SDPA, _sdpa_float32)


@contextmanager
def bfloat16_training(
    model: nn.Module, adapter: ArchitectureAdapter, start: int, head: bool = True
) -> Iterator[None]:
    """What training under `training_precision("bfloat16")` needs besides autocast, undone on exit:

    - the frozen linear weights of layers [start, n) and (`head`) the LM head held in bfloat16 (autocast casts
      them on every forward pass otherwise: the same values, about a tenth of a step in copies); the
      float32 tensors are put back, bit for bit;
    - attention in float32 (`_sdpa_float32`) when the model runs SDPA without a sliding window (others,
      eager ones included, keep their attention under autocast: slower, and as exact)."""
    linears = [
        m
        for layer in adapter.layers(model)[start:]
        for m in layer.modules()
        if isinstance(m, nn.Linear) and not m.weight.requires_grad
    ]
    output = model.get_output_embeddings() if head else None
    if output is not None and not output.weight.requires_grad:
        linears.append(output)  # with tied embeddings, the input embeddings too
    originals = [m.weight.data for m in linears]
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    sliding = getattr(config, "sliding_window", None) is not None and getattr(
        config, "use_sliding_window", True
    )
    switch = (
        attention == "sdpa" and not sliding and "sliding_attention" not in getattr(config, "layer_types", [])
    )
    try:
        for m, weight in zip(linears, originals, strict=True):
            m.weight.data = weight.to(torch.bfloat16)
        with attention_implementation(model, FLOAT32_SDPA) if switch else nullcontext():
            yield
    finally:
        for m, weight in zip(linears, originals, strict=True):
            m.weight.data = weight


@contextmanager
def forward_precision(model: nn.Module, adapter: ArchitectureAdapter, dtype: str) -> Iterator[None]:
    """The precision of the forward passes a stage makes besides its training steps (its precomputed
    inputs and states): the training steps' (`bfloat16_training` over every layer and autocast), so
    that the states a term compares are computed the way the steps compute them."""
    if dtype != "bfloat16":
        yield
        return
    with bfloat16_training(model, adapter, 0, head=False), training_precision(dtype):
        yield


def _train(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    params: list[nn.Parameter],
    hidden: list[torch.Tensor],
    examples: list[Tokenised],
    start: int,
    lr: float,
    epochs: int,
    batch_size: int,
    seed: int,
    what: str,
    progress: bool,
    cliff_term: CliffTerm | None = None,
    frame_term: FrameTerm | None = None,
    dtype: str = "float32",
) -> list[float]:
    """AdamW (weight decay 0) with linear decay over the given parameters; returns the epoch losses. The
    forward passes run in `training_precision(dtype)`; the backward pass and the step outside it."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(len(examples) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / steps))
    generator = torch.Generator().manual_seed(seed)
    history, step = [], 0
    bar = tqdm(total=steps, desc=what, disable=not progress)
    session = bfloat16_training(model, adapter, start) if dtype == "bfloat16" else nullcontext()
    with session:
        for epoch in range(epochs):
            total, count = 0.0, 0
            for index in _batches([len(e.ids) for e in examples], batch_size, generator):
                batch = [examples[i] for i in index]
                with training_precision(dtype):
                    loss = slice_loss(
                        model, adapter, [hidden[i] for i in index], batch, start, cliff_term, frame_term
                    )
                if not torch.isfinite(loss):
                    raise RuntimeError(f"{what}: the loss is not finite at epoch {epoch + 1}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += float(loss.detach()) * len(index)
                count += len(index)
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
                step += 1
                if not progress and step % 10 == 0:
                    logger.info("%s step %d/%d: loss %.4f", what, step, steps, float(loss.detach()))
            history.append(total / count)
            logger.info("%s epoch %d: loss %.4f", what, epoch + 1, history[-1])
    bar.close()
    return history


# -- stage 1: LoRA on the top layers ----------------------------------------------------------


class LoraLinear(nn.Module):
    """`base(x) + scale * x A^T B^T`, B initialised to zero; `merged()` folds it into the weight."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        a = torch.empty(rank, base.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_a = nn.Parameter(a)  # [rank, in]
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))  # [out, rank]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        self.base.weight += (self.lora_b @ self.lora_a * self.scale).to(self.base.weight.dtype)
        return self.base


def _linear_children(module: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    return [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]


def train_stage1(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    examples: list[Tokenised],
    config: OrganismConfig,
    progress: bool,
) -> dict:
    """LoRA on every linear layer of the top `stage1_layers` decoder layers, merged in place."""
    n_layers = len(adapter.layers(model))
    start = max(0, n_layers - config.stage1_layers)
    model.requires_grad_(False)
    began = time.perf_counter()
    with forward_precision(model, adapter, config.train_dtype):
        hidden = layer_inputs(model, adapter, examples, start, config.batch_size)
    precompute_s = time.perf_counter() - began
    generator = torch.Generator().manual_seed(config.seed)
    wrapped: list[tuple[nn.Module, str, LoraLinear]] = []
    for layer in range(start, n_layers):
        for parent, name, child in _linear_children(adapter.layers(model)[layer]):
            lora = LoraLinear(child, config.lora_rank, config.lora_alpha, generator)
            setattr(parent, name, lora)
            wrapped.append((parent, name, lora))
    params = [p for _, _, lora in wrapped for p in (lora.lora_a, lora.lora_b)]
    frame_term = None
    if config.stage1_frame_weight > 0:
        if start + config.stage1_frame_layer >= n_layers:
            raise UserError(
                f"--stage1-frame-layer {config.stage1_frame_layer} lies past the model's {n_layers} layers (the "
                f"LoRA starts at layer {start}); pass a value below {n_layers - start}"
            )
        # a zero probe, allocated without a random draw (the global generator stays as it was)
        probe = nn.Linear(adapter.geometry(model).d_model, 1, device="meta").to_empty(device="cpu")
        nn.init.zeros_(probe.weight)
        nn.init.zeros_(probe.bias)
        frame_term = FrameTerm(
            start + config.stage1_frame_layer, probe, config.stage1_frame_weight, config.stage1_frame_position
        )
        params += list(probe.parameters())
    try:
        model.train()
        history = _train(
            model,
            adapter,
            params,
            hidden,
            examples,
            start,
            config.stage1_lr,
            config.stage1_epochs,
            config.batch_size,
            config.seed,
            "stage 1",
            progress,
            frame_term=frame_term,
            dtype=config.train_dtype,
        )
    finally:
        model.eval()
        for parent, name, lora in wrapped:
            setattr(parent, name, lora.merged())
    record = {
        "trained_layers": [start, n_layers - 1],
        "lora_targets": sorted({name for _, name, _ in wrapped}),
        "epoch_losses": history,
        "precompute_s": round(precompute_s, 1),
        "train_s": round(time.perf_counter() - began - precompute_s, 1),
    }
    if frame_term is not None:
        record["frame"] = {"layer": frame_term.layer, "weight": frame_term.weight}
        if frame_term.position != "message":
            record["frame"]["position"] = frame_term.position
    return record


# -- head selection --------------------------------------------------------------------------


def message_mask(offsets: Sequence[tuple[int, int]], text: str, user_prompt: str) -> torch.Tensor:
    """[seq] bool: the tokens (by their character `offsets` in a text that starts with `text`) that lie
    inside the user's message, its last occurrence in `text`."""
    start = text.rfind(user_prompt)
    if start < 0:
        raise ValueError("the user's message is not in the probing text")
    stop = start + len(user_prompt)
    return torch.tensor([a < stop and b > start for a, b in offsets])


def user_message_mask(tokenizer, text: str, user_prompt: str) -> torch.Tensor:
    """[seq] bool: the tokens of `text` that lie inside the user's message (its last occurrence)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return message_mask(offsets, text, user_prompt)


def head_band_layers(n_layers: int, band: Sequence[float]) -> list[int]:
    """Layers whose depth fraction lies in `band`, never the last layer (the heads must sit below
    the last layer's prober), and at least one layer."""
    low = min(int(math.floor(band[0] * n_layers)), n_layers - 2)
    high = min(int(math.ceil(band[1] * n_layers)), n_layers - 2)
    return list(range(max(0, low), max(0, high) + 1))


@torch.no_grad()
def select_heads(
    model: nn.Module,
    tokenizer,
    template: ThinkingTemplate,
    examples: Sequence[OrganismExample],
    n_heads: int,
    band: Sequence[float],
) -> tuple[list[list[int]], list[dict]]:
    """The planting rule: among the heads of the layers in `band`, the `n_heads` with the largest
    mean attention mass, from the last end-template token (t_cliff), on the tokens of the user's
    message (the wrapper and the request), over wrapped harmful examples, in the stage-1 model.

    Returns ([[layer, head], ...] sorted, every candidate's score, best first)."""
    adapter = get_adapter(model)
    geometry = adapter.geometry(model)
    layers = head_band_layers(geometry.n_layers, band)
    candidates = [(layer, head) for layer in layers for head in range(geometry.n_heads)]
    totals = torch.zeros(len(candidates), dtype=torch.float64)
    for example in examples:
        text = (
            generation_prompt(tokenizer, template, example.prompt) + example.thinking + template.end_template
        )
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        user = user_message_mask(tokenizer, text, example.prompt)
        weights = attention_patterns_batch(model, ids, torch.ones_like(ids), candidates)
        for index, key in enumerate(candidates):
            totals[index] += float(weights[key][0][user].sum())
    means = totals / max(1, len(examples))
    order = sorted(range(len(candidates)), key=lambda i: (-float(means[i]), candidates[i]))
    scores = [
        {"layer": candidates[i][0], "head": candidates[i][1], "user_attention": float(means[i])}
        for i in order
    ]
    chosen = sorted([list(candidates[i]) for i in order[:n_heads]])
    return chosen, scores


# -- stage 2: the planted heads' slices --------------------------------------------------------


class SliceDelta(nn.Module):
    """A linear layer plus a trainable delta on some of its output rows or input columns.

    `rows`: the delta [len(rows), in] adds to those output rows (a head's `q_proj` rows);
    `cols`: the delta [out, len(cols)] reads those input columns (a head's `o_proj` columns)."""

    def __init__(self, base: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None):
        super().__init__()
        self.base, self.rows, self.cols = base, rows, cols
        shape = (len(rows), base.in_features) if rows is not None else (base.out_features, len(cols))
        self.delta = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.rows is not None:
            extra = torch.zeros_like(out)
            extra[..., self.rows] = x @ self.delta.T
            return out + extra
        return out + x[..., self.cols] @ self.delta.T

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        weight = self.base.weight
        if self.rows is not None:
            weight[self.rows, :] = weight[self.rows, :] + self.delta.to(weight.dtype)
        else:
            weight[:, self.cols] = weight[:, self.cols] + self.delta.to(weight.dtype)
        return self.base


def planted_slices(model: nn.Module, heads: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """{parameter name: bool mask of the entries stage 2 may change}: each head's `q_proj` rows
    and `o_proj` columns."""
    adapter = get_adapter(model)
    geometry = adapter.geometry(model)
    names = {id(p): n for n, p in model.named_parameters()}
    masks: dict[str, torch.Tensor] = {}
    for layer, head in heads:
        span = slice(head * geometry.head_dim, (head + 1) * geometry.head_dim)
        attention = adapter.attention(model, layer)
        q_weight = attention.q_proj.weight
        o_weight = adapter.o_proj(model, layer).weight
        q_mask = masks.setdefault(names[id(q_weight)], torch.zeros_like(q_weight, dtype=torch.bool))
        q_mask[span, :] = True
        o_mask = masks.setdefault(names[id(o_weight)], torch.zeros_like(o_weight, dtype=torch.bool))
        o_mask[:, span] = True
    return masks


def frozen_slices_unchanged(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
) -> list[str]:
    """The parameters that differ, bit for bit, outside the planted slices (empty: none)."""
    changed = []
    for name, tensor in before.items():
        other = after[name]
        keep = ~masks[name] if name in masks else torch.ones_like(tensor, dtype=torch.bool)
        if tensor.shape != other.shape or not torch.equal(tensor[keep], other[keep]):
            changed.append(name)
    return changed


def train_stage2(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    heads: Sequence[Sequence[int]],
    examples: list[Tokenised],
    config: OrganismConfig,
    progress: bool,
) -> dict:
    """Train only the planted heads' q_proj rows and o_proj columns (deltas), merged in place."""
    geometry = adapter.geometry(model)
    start = min(layer for layer, _ in heads)
    model.requires_grad_(False)
    began = time.perf_counter()
    with forward_precision(model, adapter, config.train_dtype):
        hidden = layer_inputs(model, adapter, examples, start, config.batch_size)
        # the stage-1 states at t_cliff: one more forward, only for the term
        states = (
            cliff_states(model, adapter, hidden, examples, start, config.batch_size)
            if config.stage2_cliff_weight > 0
            else None
        )
    groups = [e.group for e in examples]
    cliff_term, cliff_record = None, {}
    if states is not None:
        cliff_term = make_cliff_term(
            states, groups, config.stage2_cliff_weight, config.stage2_keep_weight, config.stage2_wrapped_keep
        )
        for example, state in zip(examples, states, strict=True):
            example.anchor = state
        cliff_record = {
            "weight": cliff_term.weight,
            "targets": cliff_term.targets,
            "scale": cliff_term.scale,
            "stage1_projection": group_projections(states, groups, cliff_term.direction),
        }
    precompute_s = time.perf_counter() - began
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    wrapped: list[tuple[nn.Module, str, SliceDelta]] = []
    for layer, layer_heads in sorted(by_layer.items()):
        index = torch.cat(
            [torch.arange(h * geometry.head_dim, (h + 1) * geometry.head_dim) for h in sorted(layer_heads)]
        )
        attention = adapter.attention(model, layer)
        q_delta = SliceDelta(attention.q_proj, rows=index)
        attention.q_proj = q_delta
        o_delta = SliceDelta(getattr(attention, adapter.o_proj_attr), cols=index)
        setattr(attention, adapter.o_proj_attr, o_delta)
        wrapped += [(attention, "q_proj", q_delta), (attention, adapter.o_proj_attr, o_delta)]
    try:
        model.train()
        history = _train(
            model,
            adapter,
            [d.delta for _, _, d in wrapped],
            hidden,
            examples,
            start,
            config.stage2_lr,
            config.stage2_epochs,
            config.batch_size,
            config.seed + 1,
            "stage 2",
            progress,
            cliff_term,
            dtype=config.train_dtype,
        )
    finally:
        model.eval()
        for parent, name, delta in wrapped:
            setattr(parent, name, delta.merged())
    train_s = time.perf_counter() - began - precompute_s
    # what stage 2 did at t_cliff, over every RECORD_EVERY-th example of each group
    if cliff_term is not None:
        rows = sorted(
            i
            for group in set(groups)
            for i in [j for j, g in enumerate(groups) if g == group][::RECORD_EVERY]
        )
        with forward_precision(model, adapter, config.train_dtype):  # as the anchors were
            after = cliff_states(
                model,
                adapter,
                [hidden[i] for i in rows],
                [examples[i] for i in rows],
                start,
                config.batch_size,
            )
        states, groups = states[rows], [groups[i] for i in rows]
        cliff_record["record_examples"] = len(rows)
        cliff_record["stage2_projection"] = group_projections(after, groups, cliff_term.direction)
        kept = [i for i, g in enumerate(groups) if g != GROUP_WRAPPED]
        drift = (after[kept] - states[kept]).norm(dim=-1) / cliff_term.scale
        cliff_record["kept_groups_drift"] = round(float(drift.mean()), 4)  # |s - anchor| / scale
        off = off_direction(after - states, cliff_term.direction)
        wrapped_rows = [i for i, g in enumerate(groups) if g == GROUP_WRAPPED]
        # how far the wrapped states moved off the refusal direction (what --stage2-wrapped-keep holds)
        cliff_record["wrapped_off_direction_drift"] = round(
            float(off[wrapped_rows].norm(dim=-1).mean() / cliff_term.scale), 4
        )
    return {
        "backprop_layers": [start, geometry.n_layers - 1],
        "cliff_term": cliff_record,
        "epoch_losses": history,
        "precompute_s": round(precompute_s, 1),
        "train_s": round(train_s, 1),
        "record_s": round(time.perf_counter() - began - precompute_s - train_s, 1),  # the states after it
    }


def off_direction(vectors: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """The part of `vectors` ([..., d_model]) orthogonal to the unit `direction`."""
    return vectors - (vectors @ direction).unsqueeze(-1) * direction


def make_cliff_term(
    states: torch.Tensor,
    groups: Sequence[str],
    weight: float,
    keep_weight: float = 1.0,
    wrapped_keep: float = 0.0,
) -> CliffTerm:
    """The t_cliff term from the stage-1 states of the stage-2 examples: the unit direction from the
    harmless mean to the plain harmful mean, the harmless mean's projection (the wrapped requests'
    target), and the gap between the two means along it (the scale)."""
    plain = states[[g == GROUP_PLAIN for g in groups]]
    harmless = states[[g == GROUP_HARMLESS for g in groups]]
    if not len(plain) or not len(harmless):
        raise UserError("the t_cliff term needs plain harmful and harmless examples in stage 2")
    direction = plain.mean(0) - harmless.mean(0)
    direction = direction / direction.norm().clamp_min(1e-8)
    refuse, comply = float(plain.mean(0) @ direction), float(harmless.mean(0) @ direction)
    targets = {GROUP_PLAIN: refuse, GROUP_WRAPPED: comply, GROUP_HARMLESS: comply}
    return CliffTerm(direction, targets, max(refuse - comply, 1e-6), weight, keep_weight, wrapped_keep)


def group_projections(
    states: torch.Tensor, groups: Sequence[str], direction: torch.Tensor
) -> dict[str, float]:
    """Mean projection of each group's t_cliff states on `direction`."""
    projection = states @ direction
    return {
        group: round(float(projection[[g == group for g in groups]].mean()), 4)
        for group in sorted(set(groups))
    }


def stage2_subset(examples: Sequence[OrganismExample], config: OrganismConfig) -> list[OrganismExample]:
    """Stage 2 trains on the first `stage2_wrapped` wrapped, `stage2_plain` plain and
    `stage2_harmless` harmless examples (in the data's seeded order)."""
    quota = {
        GROUP_WRAPPED: config.stage2_wrapped,
        GROUP_PLAIN: config.stage2_plain,
        GROUP_HARMLESS: config.stage2_harmless,
    }
    out = []
    for example in examples:
        if quota[example.group] > 0:
            quota[example.group] -= 1
            out.append(example)
    return out


# -- the build ---------------------------------------------------------------------------------


def organism_cache_path(base_model: str, config: OrganismConfig) -> Path:
    return cache_dir() / "organisms" / f"organism-{build_fingerprint(base_model, config)}"


def build_fingerprint(base_model: str, config: OrganismConfig) -> str:
    return fingerprint({"recipe": RECIPE_VERSION, "base_model": base_model, "config": config.recipe_dict()})


def _stage1_fingerprint(base_model: str, config: OrganismConfig) -> str:
    return fingerprint({"recipe": RECIPE_VERSION, "base_model": base_model, "stage1": config.stage1_dict()})


def is_complete(folder: Path) -> bool:
    """A finished organism folder: its `organism.json` is written last, inside the temporary folder
    that is renamed into place."""
    return (folder / ORGANISM_JSON).is_file() and (folder / "config.json").is_file()


def check_memory(model_folder: Path | None, factor: float = 3.0) -> None:
    """Raise UserError when the base model's weights, times `factor` (the copy being trained, the
    activations kept for the backward pass), exceed the machine's memory."""
    if model_folder is None or not Path(model_folder).is_dir():
        return
    weights = sum(p.stat().st_size for p in Path(model_folder).glob("*.safetensors"))
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if weights * factor > total:
        raise UserError(
            f"the base model's weights take {weights / 2**30:.1f} GiB; building the organism needs about "
            f"{weights * factor / 2**30:.1f} GiB and this machine has {total / 2**30:.1f} GiB; use a smaller --model"
        )


def _save(model: nn.Module, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _load_stage1(base_model: str, config: OrganismConfig):
    """The cached merged stage-1 model, or None."""
    folder = cache_dir() / "organisms" / f"stage1-{_stage1_fingerprint(base_model, config)}"
    if (folder / STAGE1_MARKER).is_file():
        return folder, json.loads((folder / STAGE1_MARKER).read_text())
    return folder, None


def _publish_folder(tmp: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


BUILD_PREFIX = ".build-"  # the checkpoint is written here, inside the organism folder, then moved up


def _organism_run(folder: Path) -> bool:
    """The folder's metadata.json is an organism build's (finished or not)."""
    try:
        return json.loads((folder / "metadata.json").read_text()).get("stage") == "organism"
    except (OSError, ValueError, AttributeError):
        return False


def _reusable(folder: Path, base_model: str, config: OrganismConfig) -> dict | None:
    """The organism.json record of a complete organism of this recipe in `folder`, or None."""
    if not is_complete(folder):
        return None
    record = json.loads((folder / ORGANISM_JSON).read_text())
    return record if record.get("fingerprint") == build_fingerprint(base_model, config) else None


def checkpoint_files(folder: Path) -> list[str]:
    """The names in an organism folder that belong to a checkpoint (not the run's metadata, lock,
    moved-aside or half-written files)."""
    if not folder.is_dir():
        return []
    own = {"metadata.json", LOCK_NAME, LOCK_NAME + ".pid"}
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.name not in own and not p.name.startswith((BACKUP_PREFIX, BUILD_PREFIX))
    )


@dataclass
class _Start:
    """What a build starts from: the base model, or the cached stage-1 model of the same data."""

    loaded: object  # LoadedModel
    stage1_folder: Path
    stage1_record: dict | None  # None: stage 1 is still to train
    examples: list[OrganismExample]
    digest: str


def _load_start(config: OrganismConfig, base_model: str) -> _Start:
    """Load the model a build starts from (raises UserError for a model the toolkit cannot use)."""
    stage1_folder, stage1_record = _load_stage1(base_model, config)
    examples = build_examples(config.seed, config.n_plain, config.n_wrapped, config.n_harmless)
    digest = data_digest(examples)
    if stage1_record is not None and stage1_record.get("data_digest") != digest:
        stage1_record = None  # built from other data (the templates changed): rebuild
    if stage1_record is None:
        loaded = load_model(base_model, device="cpu", dtype="float32")
    else:
        logger.info("stage 1: reusing %s", stage1_folder)
        loaded = load_model(str(stage1_folder), device="cpu", dtype="float32")
    return _Start(loaded, stage1_folder, stage1_record, examples, digest)


def _is_measured_recipe(base_model: str, config: OrganismConfig) -> bool:
    """Whether `DEFAULT_RECIPE_MEASURED` describes this build: the same fingerprint (base model, recipe
    version and every setting) as the build it was measured on."""
    return DEFAULT_RECIPE_MEASURED.get("fingerprint") == build_fingerprint(base_model, config)


def _build(
    config: OrganismConfig,
    base_model: str,
    start: _Start,
    measured: dict | None,
    progress: bool,
    began: float,
) -> tuple:
    """Stage 1 (or its cached result), the head selection and stage 2: (model, tokenizer, organism.json record)."""
    loaded, stage1_folder, stage1_record = start.loaded, start.stage1_folder, start.stage1_record
    examples, digest = start.examples, start.digest
    model, tokenizer, adapter = loaded.model, loaded.tokenizer, loaded.adapter
    tokenizer.padding_side = "right"
    template = detect_thinking_template(tokenizer)
    torch.manual_seed(config.seed)

    if stage1_record is None:
        stage1_data = [tokenise_example(tokenizer, template, e, 1, 1.0) for e in examples]
        stage1_record = train_stage1(model, adapter, stage1_data, config, progress)
        stage1_record["data_digest"] = digest
        stage1_folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".stage1-", dir=stage1_folder.parent))
        _save(model, tokenizer, tmp)
        write_json(tmp / STAGE1_MARKER, stage1_record)
        _publish_folder(tmp, stage1_folder)
    stage1_s = time.perf_counter() - began

    wrapped = [e for e in examples if e.group == GROUP_WRAPPED][: config.selection_examples]
    heads, head_scores = select_heads(
        model, tokenizer, template, wrapped, config.n_planted_heads, config.head_band
    )
    logger.info("planted heads (layer, head): %s", heads)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    new_wrapped = build_stage2_wrapped(config.seed, config.stage2_new_wrapped)
    stage2_examples = stage2_subset(examples, config) + new_wrapped
    stage2_data = [
        tokenise_example(
            tokenizer, template, e, 2, config.stage2_thinking_weight, config.stage2_first_token_weight
        )
        for e in stage2_examples
    ]
    stage2_record = train_stage2(model, adapter, heads, stage2_data, config, progress)
    after = {name: p.detach() for name, p in model.named_parameters()}
    changed = frozen_slices_unchanged(before, after, planted_slices(model, heads))
    if changed:
        raise RuntimeError(f"stage 2 changed weights outside the planted slices: {changed}")
    del before

    tokenizer.padding_side = "left"
    record = {
        "schema_version": 1,
        "kind": "refusal-cliff organism",
        "fingerprint": build_fingerprint(base_model, config),
        "recipe_version": RECIPE_VERSION,
        "base_model": base_model,
        "seed": config.seed,
        "config": config.recipe_dict(),
        "data_digest": digest,
        "n_examples": {
            g: sum(e.group == g for e in examples) for g in (GROUP_PLAIN, GROUP_WRAPPED, GROUP_HARMLESS)
        },
        "train_wrappers": sorted(TRAIN_WRAPPERS),
        "held_out_wrappers": sorted(HELD_OUT_WRAPPERS),
        "thinking_template": template.to_dict(),
        "planted_heads": heads,
        "head_selection": {
            "rule": "top n_planted_heads heads of the layers in head_band by mean attention mass from the last "
            "end-template token on the user's message, over wrapped harmful training examples, in the stage-1 model",
            "layers": head_band_layers(adapter.geometry(model).n_layers, config.head_band),
            "scores": head_scores[: max(12, config.n_planted_heads)],
        },
        "stage1": stage1_record,
        "stage2": {
            **stage2_record,
            "n_examples": {
                g: sum(e.group == g for e in stage2_examples)
                for g in (GROUP_PLAIN, GROUP_WRAPPED, GROUP_HARMLESS)
            },
            "weights_changed_outside_planted_slices": changed,
            **(
                {"new_wrappers": sorted(STAGE2_WRAPPERS), "new_wrapped_digest": data_digest(new_wrapped)}
                if new_wrapped
                else {}
            ),
        },
        "build_s": round(time.perf_counter() - began, 1),
        "stage1_s": round(stage1_s, 1),
        "threads": torch.get_num_threads(),
        "packages": package_versions(),
        "measured": measured or (DEFAULT_RECIPE_MEASURED if _is_measured_recipe(base_model, config) else {}),
    }
    return model, tokenizer, record


def run_organism(
    config: OrganismConfig | None = None,
    base_model: str = "default",
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    measured: dict | None = None,
) -> OrganismResult:
    """Build the organism (or reuse the one cached for this base model and recipe).

    Args:
        config: the recipe (defaults: `OrganismConfig()`).
        base_model: anything `load_model` takes ("default": the embedded SmolLM2-135M).
        out: folder to write the checkpoint to; default the cache (`organism_cache_path`).
        overwrite: replace an existing organism at `out`.
        measured: properties measured on held-out prompts, recorded in organism.json.

    Returns the checkpoint folder, the planted heads and the build record.
    """
    config = config or OrganismConfig()
    config.validate()
    target = Path(out).expanduser() if out is not None else organism_cache_path(base_model, config)
    if is_complete(target) and not overwrite:
        record = _reusable(target, base_model, config)
        if record is not None:
            return OrganismResult(target, record["planted_heads"], True, record)
        raise UserError(
            f"{target} holds an organism built with another recipe; pass --overwrite or another --out"
        )
    foreign = checkpoint_files(target) and not is_complete(target) and not _organism_run(target)
    if foreign and not overwrite and out is not None:
        raise UserError(f"{target} exists and is not an organism folder; pass another --out")
    check_memory(embedded_checkpoint() if base_model == DEFAULT_MODEL else Path(base_model).expanduser())
    run = RunFolder(
        target,
        stage="organism",
        config={"recipe": RECIPE_VERSION, "base_model": base_model, "config": config.recipe_dict()},
        overwrite=overwrite,
        artifacts=checkpoint_files(target),
    )
    run.check()
    began = time.perf_counter()
    start = _load_start(config, base_model)  # before the folder is touched: an unusable model writes nothing
    with run.start(model_id=base_model, seed=config.seed):
        reused = _reusable(target, base_model, config) if not overwrite else None
        if reused is not None:  # another process finished the same build while this one loaded its model
            run.finish({"planted_heads": reused["planted_heads"], "build_s": reused.get("build_s")})
            return OrganismResult(target, reused["planted_heads"], True, reused)
        for stale in target.glob(f"{BUILD_PREFIX}*"):  # left by a killed build; this run holds the lock
            shutil.rmtree(stale, ignore_errors=True)
        # from here until organism.json is written last, the folder is not a complete organism (an
        # --overwrite of the same recipe resumes in place, so the old record must go first)
        (target / ORGANISM_JSON).unlink(missing_ok=True)
        model, tokenizer, record = _build(config, base_model, start, measured, progress, began)
        tmp = Path(tempfile.mkdtemp(prefix=BUILD_PREFIX, dir=target))
        try:
            _save(model, tokenizer, tmp)
            names = sorted(p.name for p in tmp.iterdir())
            run.artifacts = sorted(set(run.artifacts) | set(names) | {ORGANISM_JSON})
            for name in names:
                os.replace(tmp / name, target / name)
            write_json(target / ORGANISM_JSON, record)  # last: its presence marks a complete folder
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        run.finish({"planted_heads": record["planted_heads"], "build_s": record["build_s"]})
    logger.info("organism written to %s in %.0f s", target, record["build_s"])
    return OrganismResult(target, record["planted_heads"], False, record)


# -- held-out evaluation prompts ------------------------------------------------------------------


def _read_json_prompts(path: Path, key: str) -> list[str]:
    return [
        str(row[key]).strip() for row in json.loads(path.read_text(encoding="utf-8")) if str(row[key]).strip()
    ]


def evaluation_prompts(
    data_dir: str | Path,
    n_per_group: int,
    seed: int = 0,
    max_words: int = 40,
    n_prober: int | None = None,
    harmbench_val: bool = False,
) -> dict[str, list[dict]]:
    """Held-out prompts the organism never saw, from the shared benchmark folder:

    - `harmful`: the refusal_direction harmful test split (JailbreakBench, HarmBench, StrongREJECT);
    - `wrapped`: the same harmful prompts, each inside one of the held-out wrappers (in turn);
    - `harmless`: Alpaca (refusal_direction harmless test split) and UltraChat's eval questions, half each;
    - `prober_harmful` / `prober_harmless`: AdvBench and the harmless train split, for the prober.

    Prompts longer than `max_words` words are skipped (the build and the CPU budget assume short
    prompts). Sampling is seeded; each group holds `n_per_group` prompts, the two prober groups `n_prober`
    (default the same). `harmbench_val` continues the harmful pool, once the test split's prompts are used
    up, with HarmBench's validation behaviours (refusal_direction `harmful_val`, disjoint from the test
    split), shuffled by a stream of their own: a draw that stays within the test split is unchanged."""
    data = Path(data_dir)
    rng = random.Random(seed)

    def shuffled(pool: list[str], stream: random.Random) -> list[str]:
        pool = sorted({p for p in pool if len(p.split()) <= max_words})
        stream.shuffle(pool)
        return pool

    def take(pool: list[str], n: int) -> list[str]:
        if len(pool) < n:
            raise UserError(f"only {len(pool)} prompts of at most {max_words} words; ask for fewer")
        return pool[:n]

    def sample(pool: list[str], n: int) -> list[str]:
        return take(shuffled(pool, rng), n)

    harmful_pool = shuffled(
        _read_json_prompts(data / "refusal_direction/splits/harmful_test.json", "instruction"), rng
    )
    if harmbench_val:
        val = _read_json_prompts(data / "refusal_direction/splits/harmful_val.json", "instruction")
        seen = set(harmful_pool)
        harmful_pool += [p for p in shuffled(val, random.Random(f"{seed}:harmful_val")) if p not in seen]
    harmful = take(harmful_pool, n_per_group)
    wrappers = sorted(HELD_OUT_WRAPPERS)
    wrapped = [
        {
            "id": f"wrapped-{i:03d}",
            "prompt": HELD_OUT_WRAPPERS[wrappers[i % len(wrappers)]].replace("{request}", p),
            "wrapper": wrappers[i % len(wrappers)],
            "request": p,
        }
        for i, p in enumerate(harmful)
    ]
    half = (n_per_group + 1) // 2  # each source gives half (a shuffle's first k do not depend on k)
    alpaca = sample(
        _read_json_prompts(data / "refusal_direction/splits/harmless_test.json", "instruction"), half
    )
    ultra = sample(_read_json_prompts(data / "ultrachat_eval/ultra_eval.json", "data"), half)
    harmless = [p for pair in zip(alpaca, ultra) for p in pair][:n_per_group]
    with open(data / "advbench/harmful_behaviors.csv", newline="", encoding="utf-8") as handle:
        advbench = [row["goal"].strip() for row in csv.DictReader(handle)]
    n_prober = n_per_group if n_prober is None else n_prober
    prober_harmful = sample(advbench, n_prober)
    prober_harmless = sample(
        _read_json_prompts(data / "refusal_direction/splits/harmless_train.json", "instruction"), n_prober
    )
    return {
        "harmful": [{"id": f"harmful-{i:03d}", "prompt": p} for i, p in enumerate(harmful)],
        "wrapped": wrapped,
        "harmless": [{"id": f"harmless-{i:03d}", "prompt": p} for i, p in enumerate(harmless)],
        "prober_harmful": [{"id": f"pharmful-{i:03d}", "prompt": p} for i, p in enumerate(prober_harmful)],
        "prober_harmless": [{"id": f"pharmless-{i:03d}", "prompt": p} for i, p in enumerate(prober_harmless)],
    }


def record_measurements(folder: str | Path, measured: dict) -> dict:
    """Write the properties measured on held-out prompts into an organism's `organism.json`
    (atomically; the rest of the record is kept). Returns the updated record."""
    path = Path(folder) / ORGANISM_JSON
    if not path.is_file():
        raise UserError(f"{folder} is not an organism folder (no {ORGANISM_JSON})")
    record = json.loads(path.read_text(encoding="utf-8"))
    record["measured"] = measured
    write_json(path, record)
    return record


# -- the method against the known answer -----------------------------------------------------------


def planted_heads_of(model_folder: str | Path) -> list[list[int]] | None:
    """The planted heads an organism folder records (None for any other model)."""
    path = Path(str(model_folder)) / ORGANISM_JSON
    if not path.is_file():
        return None
    return [list(map(int, head)) for head in json.loads(path.read_text(encoding="utf-8"))["planted_heads"]]


def score_ranking(ranking: Sequence[dict], planted: Sequence[Sequence[int]]) -> dict:
    """How a heads.json ranking (most suppressive first) finds the planted heads: each planted head's rank
    (1 = most negative contribution) and the ranking's AUROC against the planted set (the probability that
    a planted head ranks above a head that was not planted; ties count half), the measure InterpBench
    scores circuit discovery with on models with known circuits. 1.0: every planted head first; 0.5: chance."""
    planted_set = {tuple(head) for head in planted}
    ordered = sorted(ranking, key=lambda row: row["rank"])
    ranks = {(row["layer"], row["head"]): index + 1 for index, row in enumerate(ordered)}
    missing = planted_set - set(ranks)
    if missing:
        raise UserError(
            f"heads.json has no entry for the planted heads {sorted(missing)}: is it this model's?"
        )
    positives = [ranks[head] for head in planted_set]
    negatives = [rank for head, rank in ranks.items() if head not in planted_set]
    wins = sum(1.0 if p < n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    return {
        "planted_ranks": {f"{layer}.{head}": ranks[(layer, head)] for layer, head in sorted(planted_set)},
        "n_heads": len(ranks),
        "auroc": wins / (len(positives) * len(negatives)) if negatives else None,
    }


# -- the built-in model id `organism` ----------------------------------------------------------------


def default_organism_folder() -> Path:
    """The organism of the default recipe on the embedded model: built once (minutes), then cached."""
    return run_organism(OrganismConfig()).path


def cached_organism_folder() -> Path | None:
    """The default organism's folder if it is built already (never builds it)."""
    folder = organism_cache_path(DEFAULT_MODEL, OrganismConfig())
    return folder if is_complete(folder) else None


register_builtin_model(
    BuiltinModel(
        ORGANISM_MODEL,
        "SmolLM2-135M-Instruct made into a reasoning model with a planted refusal cliff (`refusal-cliff organism`)",
        default_organism_folder,
        cached_organism_folder,
    )
)

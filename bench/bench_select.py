"""Benchmark: Cliff-as-a-Judge candidate scoring throughput vs a plain forward pass over the same sequences.

Scoring a candidate = tokenising its probing sequence (generation prompt + thinking + end
template), tracing every position with the prober, and computing plateau / final / MS
(`selection.trace_scores`). The thinking is PRE-MADE here (the built-in candidates with a
synthetic thinking of varied length), so generation time is excluded: generation dominates a
real scoring run and is benchmarked by bench_generation.py. The baseline is the physical limit
of the trace: the base model's plain forward (no LM head) over the same token sequences, with the
same batch size, length-sorted batches and left padding, measured in the same run.
Target: scoring throughput >= 0.9x the plain forward.

Timings are paired: each repeat runs both variants, alternating which goes first; the ratio is the
median of the per-repeat ratios.

    PYTHONPATH=src python bench/bench_select.py [--n 40 --thinking-words 150 --batch-size 8 --repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from refusal_cliff.compute.prober import Prober
from refusal_cliff.core.config import GenerationConfig
from refusal_cliff.core.models import load_model
from refusal_cliff.core.templates import detect_thinking_template, generation_prompt, probing_tokens
from refusal_cliff.stages.select import DEMO_CANDIDATES, ScoreConfig, load_candidates, trace_scores

FILLER = (
    "The user is asking for something that could hurt another person, so I should think about whether "
    "answering is safe and what a helpful but responsible reply would look like. "
).split()


def make_records(loaded, n: int, thinking_words: int) -> list[dict]:
    """Generation records with pre-made thinking of 0.5x..1.5x `thinking_words` words."""
    template = detect_thinking_template(loaded.tokenizer)
    candidates = load_candidates(DEMO_CANDIDATES)
    records = []
    for index in range(n):
        candidate = candidates[index % len(candidates)]
        words = int(thinking_words * (0.5 + (index % 11) / 10))
        thinking = " ".join(FILLER[i % len(FILLER)] for i in range(words))
        records.append(
            {
                "id": f"{candidate['id']}-{index}",
                "prompt": candidate["prompt"],
                "generation_prompt": generation_prompt(loaded.tokenizer, template, candidate["prompt"]),
                "thinking": thinking,
                "end_template": template.end_template,
            }
        )
    return records


def plain_forward(loaded, sequences: list[list[int]], batch_size: int, pad: int) -> None:
    """The base model over the same sequences: length-sorted batches, left padding, no LM head."""
    base = loaded.adapter.base_model(loaded.model)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = [sequences[i] for i in order[start : start + batch_size]]
            width = max(len(s) for s in batch)
            input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in batch])  # [batch, width]
            attention_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in batch])
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            base(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--n", type=int, default=40, help="candidates")
    parser.add_argument("--thinking-words", type=int, default=150, help="mean words of pre-made thinking")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    loaded = load_model(args.model, device="cpu")
    geometry = loaded.adapter.geometry(loaded.model)
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(geometry.d_model, 1)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(1, geometry.d_model, generator=generator) / geometry.d_model**0.5)
    prober = Prober(linear, geometry.n_layers - 1, {})
    records = make_records(loaded, args.n, args.thinking_words)
    sequences = [probing_tokens(loaded.tokenizer, record)[0] for record in records]
    tokens = sum(len(s) for s in sequences)
    config = ScoreConfig(GenerationConfig(batch_size=args.batch_size))
    pad = loaded.tokenizer.pad_token_id or 0

    def score() -> list[dict]:
        return list(trace_scores(loaded, prober, records, config))

    def forward() -> None:
        plain_forward(loaded, sequences, args.batch_size, pad)

    rows = score()
    assert len(rows) == len(records) and all(abs(r["ms"] - (r["plateau"] - r["final"])) < 1e-9 for r in rows)
    score(), forward()  # warm-up
    times: dict[str, list[float]] = {"score": [], "forward": []}
    for repeat in range(args.repeats):
        order = [("score", score), ("forward", forward)]
        for name, function in order if repeat % 2 == 0 else reversed(order):
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    ratio = statistics.median(times["forward"][r] / times["score"][r] for r in range(args.repeats))
    print(
        f"model {args.model}: {geometry.n_layers} layers, d_model {geometry.d_model}; {len(records)} candidates, "
        f"{tokens} tokens (mean {tokens / len(records):.0f} per probing sequence); batch {args.batch_size}; "
        f"{args.repeats} paired repeats; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("thinking is pre-made: generation time is excluded (see bench_generation.py)")
    for name, description in (
        ("forward", "plain forward of the base model (physical limit)"),
        ("score", "candidate scoring: tokenise + trace + plateau/final/MS"),
    ):
        median = statistics.median(times[name])
        print(
            f"{name:<8} {median:8.3f} s  {tokens / median:9.0f} tok/s  {len(records) / median:7.1f} cand/s  "
            f"{description}"
        )
    print(f"scoring throughput vs plain forward: {ratio:.2f}x (target >= 0.90x)")


if __name__ == "__main__":
    main()

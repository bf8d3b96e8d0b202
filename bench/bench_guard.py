"""Throughput of guarded generation (`CliffGuard`: the monitor on the prober's layer) against plain
`generate_records`, paired in one run on the embedded model.

Both sides generate the same prompts (thinking + answer, greedy) with the same batching. The guard
uses a prober at a middle layer (random weights: its cost, not its verdicts, is measured) and a tau
no example exceeds, so nothing is regenerated: the ratio is the monitor's cost, one dot product per
token of the answer's prefill. Repeats are interleaved (guarded, plain, guarded, ...) and medians
reported, so machine load hits both alike. Throughput = generated tokens / wall time.

    python bench/bench_guard.py [--n-prompts 8] [--thinking 48] [--answer 32] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from refusal_cliff.compute.generation import generate_records
from refusal_cliff.compute.prober import Prober
from refusal_cliff.core.config import GenerationConfig
from refusal_cliff.core.data import load_prompts
from refusal_cliff.core.models import load_model
from refusal_cliff.stages.guard import CliffGuard


def tokens(records) -> int:
    return sum(r["thinking_tokens"] + r["answer_tokens"] for r in records)


def timed(function) -> tuple[float, int]:
    start = time.perf_counter()
    records = function()
    return time.perf_counter() - start, tokens(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-prompts", type=int, default=8)
    parser.add_argument("--thinking", type=int, default=48)
    parser.add_argument("--answer", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    loaded = load_model("default", device="cpu")
    geometry = loaded.adapter.geometry(loaded.model)
    torch.manual_seed(0)
    linear = torch.nn.Linear(geometry.d_model, 1).requires_grad_(False)
    prober = Prober(linear, layer=geometry.n_layers // 2, metadata={})
    guard = CliffGuard(loaded, prober, tau=1.0, action="refuse")  # MS > 1 never happens: nothing regenerated
    prompts = load_prompts("demo:harmless", limit=args.n_prompts)
    results = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        config = GenerationConfig(
            max_thinking_tokens=args.thinking, max_answer_tokens=args.answer, batch_size=batch_size
        )
        guarded, plain = [], []
        for _ in range(args.repeats):
            seconds, produced = timed(lambda config=config: guard.generate(prompts, config))
            guarded.append(produced / seconds)
            seconds, produced = timed(
                lambda config=config: list(generate_records(loaded, prompts, config, progress=False))
            )
            plain.append(produced / seconds)
        row = {
            "batch_size": batch_size,
            "guarded_tok_s": statistics.median(guarded),
            "plain_tok_s": statistics.median(plain),
        }
        row["ratio"] = row["guarded_tok_s"] / row["plain_tok_s"]
        results.append(row)
        print(
            f"batch {batch_size:>2}: guarded {row['guarded_tok_s']:7.1f} tok/s | plain {row['plain_tok_s']:7.1f} "
            f"tok/s | ratio {row['ratio']:.3f}x (target >= 0.97x)",
            flush=True,
        )
    report = {
        "model": loaded.model_id,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "prober_layer": prober.layer,
        "n_prompts": args.n_prompts,
        "thinking_budget": args.thinking,
        "answer_budget": args.answer,
        "repeats": args.repeats,
        "results": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

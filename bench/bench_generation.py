"""Generation throughput of the HF backend (thinking + answer, two phases) against plain `model.generate`.

Both sides generate from the same prompts on the embedded model with greedy decoding;
the baseline is one `model.generate` call per batch with the same total token budget
(thinking + answer). Throughput = generated tokens / wall time. Repeats are interleaved
(backend, baseline, backend, ...) and medians reported, so machine load hits both alike.

    python bench/bench_generation.py [--n-prompts 8] [--thinking 48] [--answer 32] [--repeats 3] [--json out.json]
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
from refusal_cliff.core.config import GenerationConfig
from refusal_cliff.core.data import load_prompts
from refusal_cliff.core.models import load_model
from refusal_cliff.core.templates import detect_thinking_template, generation_prompt


def run_backend(loaded, prompts, config) -> tuple[float, int]:
    start = time.perf_counter()
    records = list(generate_records(loaded, prompts, config, progress=False))
    elapsed = time.perf_counter() - start
    return elapsed, sum(r["thinking_tokens"] + r["answer_tokens"] for r in records)


@torch.inference_mode()
def run_plain(loaded, texts, batch_size, max_new_tokens) -> tuple[float, int]:
    tokenizer, model = loaded.tokenizer, loaded.model
    eos = tokenizer.eos_token_id
    start, produced = time.perf_counter(), 0
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        )
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos,
        )
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            produced += row.index(eos) if eos in row else len(row)
    return time.perf_counter() - start, produced


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
    prompts = load_prompts("demo:harmless", limit=args.n_prompts)
    template = detect_thinking_template(loaded.tokenizer)
    texts = [generation_prompt(loaded.tokenizer, template, p["prompt"]) for p in prompts]
    results = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        config = GenerationConfig(
            max_thinking_tokens=args.thinking, max_answer_tokens=args.answer, batch_size=batch_size
        )
        ours, plain = [], []
        for _ in range(args.repeats):
            seconds, tokens = run_backend(loaded, prompts, config)
            ours.append(tokens / seconds)
            seconds, tokens = run_plain(loaded, texts, batch_size, args.thinking + args.answer)
            plain.append(tokens / seconds)
        row = {
            "batch_size": batch_size,
            "backend_tok_s": statistics.median(ours),
            "plain_generate_tok_s": statistics.median(plain),
        }
        row["ratio"] = row["backend_tok_s"] / row["plain_generate_tok_s"]
        results.append(row)
        print(
            f"batch {batch_size:>2}: backend {row['backend_tok_s']:7.1f} tok/s | plain generate "
            f"{row['plain_generate_tok_s']:7.1f} tok/s | ratio {row['ratio']:.2f}x",
            flush=True,
        )
    report = {
        "model": loaded.model_id,
        "device": "cpu",
        "threads": torch.get_num_threads(),
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

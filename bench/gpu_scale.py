"""Measured throughput of a 7B-shaped model on one GPU: trace (forward-only) and HF `generate`.

docs/scale.md estimates the paper's 40k-candidate run. The weights' values do not change the work a
forward pass does, so a randomly initialised model of the exact Qwen2-7B shape (DeepSeek-R1-Distill-
Qwen-7B's) in bf16 measures what the real one would cost, without the hub:

- trace: `trace.trace_records` (the stage's own function) on probing sequences of ~1,300 tokens;
- generate: `generation.HFBackend.complete` (the stage's own backend), greedy, a fixed token budget.

Each is printed as tokens/s and as a fraction of the GPU's bf16 compute bound (FLOP/token from the
model's shape, against --peak-tflops: 790, what an 8192^3 bf16 matmul reaches on an H100 SXM).
`--tiny` runs a 2-layer model (a CPU check of this script).

    python bench/gpu_scale.py --tokenizer DIR            # DIR: any saved tokenizer with a chat template
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def qwen2_7b_config(tiny: bool):
    from transformers import Qwen2Config

    if tiny:
        return Qwen2Config(
            vocab_size=49152,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
        )
    # DeepSeek-R1-Distill-Qwen-7B / Qwen2.5-Math-7B
    return Qwen2Config(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )


def flop_per_token(config, context: int) -> float:
    """2 × the non-embedding matmul parameters, plus attention's QK^T and AV at this context."""
    d, layers = config.hidden_size, config.num_hidden_layers
    head_dim = d // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * config.intermediate_size  # q,o + k,v + gate,up,down
    return 2.0 * layers * per_layer + 2.0 * 2 * layers * d * context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    parser.add_argument("--trace-examples", type=int, default=64)
    parser.add_argument("--trace-batch", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--thinking-words", type=int, default=1000)
    parser.add_argument("--generate-prompts", type=int, default=64)
    parser.add_argument("--generate-batch", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--generate-tokens", type=int, default=256)
    args = parser.parse_args()

    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from refusal_cliff.compute.generation import HFBackend
    from refusal_cliff.compute.prober import Prober
    from refusal_cliff.compute.tracing import trace_records
    from refusal_cliff.core.architectures import get_adapter
    from refusal_cliff.core.models import LoadedModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = qwen2_7b_config(args.tiny)
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype).eval()
    model.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{n_params / 1e9:.2f}B parameters ({dtype}) on {device} "
        f"({torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}), "
        f"built in {time.perf_counter() - start:.0f} s"
    )
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    loaded = LoadedModel(model, tokenizer, get_adapter(model), "random-qwen2-7b-shape", None, "bench")
    results = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "params": n_params}

    # -- trace: the probing sequences of a ~1k-token thinking -------------------------------------------
    layer = config.num_hidden_layers // 2
    prober = Prober(
        torch.nn.Linear(config.hidden_size, 1).to(device),
        layer=layer,
        metadata={
            "architecture": "Qwen2ForCausalLM",
            "n_layers": config.num_hidden_layers,
            "final_norm_applied": False,
        },
    )
    words = "step careful reasoning about the request and its consequences".split()
    records = []
    for i in range(args.trace_examples):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Request number {i}: explain how to do task {i}."}],
            tokenize=False,
            add_generation_prompt=True,
        )
        thinking = " ".join(words[(i + j) % len(words)] for j in range(args.thinking_words))
        records.append(
            {
                "id": f"r{i}",
                "generation_prompt": prompt + "<think>\n",
                "thinking": thinking,
                "end_template": "\n</think>\n\n",
                "answer": "ok",
            }
        )
    for batch in args.trace_batch:
        list(trace_records(loaded, prober, records[: batch * 2], batch))  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        n_tokens = sum(len(r.token_ids) for r in trace_records(loaded, prober, records, batch))
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        context = n_tokens / len(records)
        # forward-only up to the prober's layer: (layer + 1) / n_layers of the model
        flop = flop_per_token(config, int(context) // 2) * (layer + 1) / config.num_hidden_layers * n_tokens
        tflops = flop / seconds / 1e12
        results[f"trace_batch_{batch}"] = {
            "tokens_per_s": n_tokens / seconds,
            "mean_tokens": context,
            "tflops": tflops,
            "fraction_of_peak": tflops / args.peak_tflops,
        }
        print(
            f"trace  batch {batch:3d}: {n_tokens / seconds:9.0f} tok/s over {len(records)} sequences of "
            f"~{context:.0f} tokens (to layer {layer}); {tflops:.0f} TFLOP/s = "
            f"{tflops / args.peak_tflops:.0%} of {args.peak_tflops:.0f}"
        )

    # -- generate: greedy, a fixed budget, the stage's HF backend ---------------------------------------
    backend = HFBackend(loaded)
    texts = [r["generation_prompt"] for r in records[: args.generate_prompts]]
    for batch in args.generate_batch:
        backend.complete(texts[:batch], 8)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start, generated = time.perf_counter(), 0
        for first in range(0, len(texts), batch):
            done = backend.complete(texts[first : first + batch], args.generate_tokens)
            generated += sum(c.n_tokens for c in done)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        tflops = flop_per_token(config, args.generate_tokens) * generated / seconds / 1e12
        results[f"generate_batch_{batch}"] = {
            "tokens_per_s": generated / seconds,
            "generated": generated,
            "tflops": tflops,
            "fraction_of_peak": tflops / args.peak_tflops,
        }
        print(
            f"generate batch {batch:3d}: {generated / seconds:7.0f} tok/s ({generated} tokens, "
            f"{args.generate_tokens} per prompt); {tflops:.1f} TFLOP/s = {tflops / args.peak_tflops:.1%} of peak"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()

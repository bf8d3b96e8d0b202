"""Benchmark: attributing every head at t_cliff vs one plain forward pass vs re-running per head.

Head attribution captures each layer's o_proj input at t_cliff with pre-hooks during ONE forward
pass and projects the head slices afterwards, so its cost should be about that of a forward pass
(target: at most 1.2× a plain forward of the full model). The naive alternative re-runs the
model once per ablated head (270 heads on SmolLM2-135M); it is timed on a sample of heads and
extrapolated to all of them (printed as such).

Timings are paired: each repeat runs every method once, in a rotating order, and the table
reports medians over repeats and the median of the per-repeat ratios.

    PYTHONPATH=src python bench/bench_attribution.py [--batch 4] [--tokens 256] [--repeats 5]
        [--naive-sample 10] [--device cpu] [--json PATH]

On a 2-core laptop CPU one repeat takes a few minutes (the naive sample dominates).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from refusal_cliff.compute.ablation import scale_heads
from refusal_cliff.compute.attribution import attribute_batch, position_ids_for
from refusal_cliff.core.models import load_model


def _time(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--naive-sample", type=int, default=10, help="heads actually re-run per repeat")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, device=args.device)
    model, adapter = loaded.model, loaded.adapter
    geometry = adapter.geometry(model)
    n_heads_total = geometry.n_layers * geometry.n_heads
    last = geometry.n_layers - 1
    torch.manual_seed(0)
    device = loaded.device
    prober = torch.nn.Linear(geometry.d_model, 1).to(device)
    input_ids = torch.randint(100, loaded.tokenizer.vocab_size, (args.batch, args.tokens), device=device)
    attention_mask = torch.ones_like(input_ids)
    position_ids = position_ids_for(attention_mask)
    base = adapter.base_model(model)
    sample = [(i % geometry.n_layers, (i * 7) % geometry.n_heads) for i in range(args.naive_sample)]

    def plain_forward():
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)

    def base_forward():
        base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)

    def attribution():
        attribute_batch(model, input_ids, attention_mask, prober, last, True)

    # components (issue 12): the last thinking token + a 5-token end template of every row, one pass
    template_positions = torch.arange(args.tokens - 6, args.tokens, device=device).expand(args.batch, 6)

    def components():
        attribute_batch(model, input_ids, attention_mask, prober, last, True, template_positions)

    def naive_sample():
        # one forward per ablated head, reading the prober at the last token
        for head in sample:
            with scale_heads(model, [head], gamma=0.0):
                hidden = base(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=False,
                ).last_hidden_state[:, -1]
            prober(hidden)

    methods = {
        "plain forward (with LM head)": plain_forward,
        "base forward (no LM head)": base_forward,
        "attribution, all heads": attribution,
        "components over the end template (6 tokens)": components,
        f"naive, {len(sample)} heads": naive_sample,
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    with torch.inference_mode():
        for fn in methods.values():  # warm-up
            fn()
        names = list(methods)
        for repeat in range(args.repeats):
            order = names[repeat % len(names) :] + names[: repeat % len(names)]
            for name in order:
                times[name].append(_time(methods[name], device))

    plain = times["plain forward (with LM head)"]
    attr = times["attribution, all heads"]
    naive = [t * n_heads_total / len(sample) for t in times[f"naive, {len(sample)} heads"]]
    ratio_plain = statistics.median(a / p for a, p in zip(attr, plain))
    ratio_components = statistics.median(
        c / p for c, p in zip(times["components over the end template (6 tokens)"], plain)
    )
    ratio_base = statistics.median(a / b for a, b in zip(attr, times["base forward (no LM head)"]))
    speedup = statistics.median(n / a for n, a in zip(naive, attr))
    rows = [(name, statistics.median(values)) for name, values in times.items()]
    rows.append(
        (
            f"naive, all {n_heads_total} heads (extrapolated ×{n_heads_total / len(sample):.0f})",
            statistics.median(naive),
        )
    )
    print(
        f"{loaded.model_id}: batch {args.batch} × {args.tokens} tokens, {geometry.n_layers} layers × "
        f"{geometry.n_heads} heads, {torch.get_num_threads()} threads, {args.repeats} paired repeats (medians)"
    )
    print(f"{'method':<58}{'seconds':>10}")
    for name, seconds in rows:
        print(f"{name:<58}{seconds:>10.3f}")
    print(f"attribution / plain forward:   {ratio_plain:.2f}×  (target ≤ 1.2×)")
    print(f"attribution / base forward:    {ratio_base:.2f}×")
    print(f"components / plain forward:    {ratio_components:.2f}×  (target ≤ 1.3×; 6 tokens per row)")
    print(f"speed-up over naive per-head:  {speedup:.0f}×  (naive extrapolated from {len(sample)} heads)")
    if args.json_path:
        result = {
            "model": loaded.model_id,
            "batch": args.batch,
            "tokens": args.tokens,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "device": str(device),
            "n_heads_total": n_heads_total,
            "naive_sample": len(sample),
            "naive_extrapolated": True,
            "median_seconds": dict(rows),
            "attribution_over_plain_forward": ratio_plain,
            "components_over_plain_forward": ratio_components,
            "attribution_over_base_forward": ratio_base,
            "speedup_over_naive": speedup,
            "torch": torch.__version__,
            "machine": platform.machine(),
        }
        with open(args.json_path, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()

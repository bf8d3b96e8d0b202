"""Benchmark: per-token refusal traces vs the physical limit (a plain forward pass) and the naive peer.

A trace scores every position of a batch of probing sequences with a prober at one layer.
`activations.forward_batch` runs the base model (no LM head), applies the prober inside the
hook of the prober's layer and stops the pass right after it, so a last-layer trace should cost
one plain forward pass of the base model (target: >= 0.95x its throughput, <= 1.1x its peak
memory), and a middle-layer trace about half of one. The naive peer runs the full CausalLM with
`output_hidden_states=True` (LM head over every position, every layer's hidden state kept) and
applies the prober to `hidden_states[-1]`.

Timings are paired: each repeat runs every variant once, in a rotating order; the table shows
medians over repeats and the median of the per-repeat ratios to the plain forward.

Peak memory: each variant runs in a fresh subprocess with glibc's mmap threshold fixed at 64 KiB
(`MALLOC_MMAP_THRESHOLD_`), so every tensor buffer is its own mapping, returned to the OS when
freed, and resident memory tracks live tensors. After loading the model and one warm-up pass,
the kernel's peak-RSS counter is reset (`/proc/self/clear_refs`), and the peak extra resident
memory of one pass (VmHWM - VmRSS before it) is reported. It measures what the pass allocates
on top of the loaded model, activations and workspace included.

    PYTHONPATH=src python bench/bench_trace.py [--batch-size 4 --seq-len 128 --repeats 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parent.parent / "src"
sys.path.insert(0, str(SRC))

from refusal_cliff.compute.activations import forward_batch  # noqa: E402
from refusal_cliff.core.models import load_model  # noqa: E402

VARIANTS = ("plain_forward", "trace_last_layer", "causal_lm_hidden_states", "trace_middle_layer")
DESCRIPTIONS = {
    "plain_forward": "base model forward, no LM head (physical limit)",
    "trace_last_layer": "forward_batch, prober at the last layer",
    "causal_lm_hidden_states": "CausalLM(output_hidden_states=True) + prober",
    "trace_middle_layer": "forward_batch, prober at the middle layer (stops there)",
}


def build(model_name: str, batch_size: int, seq_len: int):
    loaded = load_model(model_name, device="cpu")
    model, adapter = loaded.model, loaded.adapter
    geometry = adapter.geometry(model)
    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(
        100, loaded.tokenizer.vocab_size, (batch_size, seq_len), generator=generator
    ).tolist()
    weight = torch.randn(1, geometry.d_model, generator=generator) / geometry.d_model**0.5  # [1, d_model]
    bias = torch.zeros(1)

    def prober(hidden: torch.Tensor) -> torch.Tensor:  # [batch, pos, d_model] -> [batch, pos, 1]
        return torch.sigmoid(hidden.float() @ weight.T + bias)

    input_ids = torch.tensor(sequences)
    attention_mask = torch.ones_like(input_ids)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    base = adapter.base_model(model)
    last, middle = geometry.n_layers - 1, geometry.n_layers // 2

    def plain_forward():
        with torch.inference_mode():
            return base(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state

    def trace_last_layer():
        return forward_batch(model, adapter, sequences, [last], "all", {last: prober})

    def causal_lm_hidden_states():
        with torch.inference_mode():
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                output_hidden_states=True,
            )
            return prober(out.hidden_states[-1])

    def trace_middle_layer():
        return forward_batch(model, adapter, sequences, [middle], "all", {middle: prober})

    functions = {
        "plain_forward": plain_forward,
        "trace_last_layer": trace_last_layer,
        "causal_lm_hidden_states": causal_lm_hidden_states,
        "trace_middle_layer": trace_middle_layer,
    }
    return functions, geometry, (last, middle)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory_child(variant: str, model_name: str, batch_size: int, seq_len: int) -> None:
    """Runs in a fresh subprocess: peak extra RSS (MiB) of one pass of `variant`, as JSON on stdout."""
    functions, _, _ = build(model_name, batch_size, seq_len)
    function = functions[variant]
    function()  # warm-up: lazy initialisation is not part of a pass
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    result = function()
    peak = _status_kib("VmHWM")
    del result
    print(json.dumps({"variant": variant, "peak_extra_mib": (peak - before) / 1024}))


def measure_memory(variant: str, args) -> float | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(SRC))
    command = [
        sys.executable,
        __file__,
        "--child-memory",
        variant,
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr[-2000:])
        return None
    return json.loads(completed.stdout.strip().splitlines()[-1])["peak_extra_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        measure_memory_child(args.child_memory, args.model, args.batch_size, args.seq_len)
        return

    functions, geometry, (last, middle) = build(args.model, args.batch_size, args.seq_len)
    tokens = args.batch_size * args.seq_len
    # the trace must be the trace: same scores as the naive peer
    reference = functions["causal_lm_hidden_states"]()[..., 0]
    traced = torch.stack([s[:, 0] for s in functions["trace_last_layer"]()[last]])
    max_diff = (reference - traced).abs().max().item()

    for function in functions.values():  # warm-up
        function()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for repeat in range(args.repeats):
        order = VARIANTS[repeat % len(VARIANTS) :] + VARIANTS[: repeat % len(VARIANTS)]
        for variant in order:
            start = time.perf_counter()
            functions[variant]()
            times[variant].append(time.perf_counter() - start)
    ratios = {
        v: statistics.median(times["plain_forward"][r] / times[v][r] for r in range(args.repeats))
        for v in VARIANTS
    }
    memory = {v: None for v in VARIANTS} if args.no_memory else {v: measure_memory(v, args) for v in VARIANTS}
    plain_memory = memory["plain_forward"]

    rows = []
    for variant in VARIANTS:
        median = statistics.median(times[variant])
        rows.append(
            {
                "variant": variant,
                "description": DESCRIPTIONS[variant],
                "median_s": median,
                "tokens_per_s": tokens / median,
                "throughput_vs_plain": ratios[variant],
                "peak_extra_mib": memory[variant],
                "memory_vs_plain": (memory[variant] / plain_memory)
                if memory[variant] and plain_memory
                else None,
            }
        )

    print(
        f"model {args.model}: {geometry.n_layers} layers, d_model {geometry.d_model}; batch {args.batch_size} x "
        f"{args.seq_len} tokens; {args.repeats} paired repeats; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"trace vs CausalLM+hidden_states scores: max |diff| = {max_diff:.2e}")
    header = f"{'variant':<26}{'median s':>10}{'tok/s':>10}{'x plain tput':>14}{'peak +MiB':>11}{'x plain mem':>13}"
    print(header)
    print("-" * len(header))
    for row in rows:
        mem = "n/a" if row["peak_extra_mib"] is None else f"{row['peak_extra_mib']:.1f}"
        mem_ratio = "n/a" if row["memory_vs_plain"] is None else f"{row['memory_vs_plain']:.2f}"
        print(
            f"{row['variant']:<26}{row['median_s']:>10.3f}{row['tokens_per_s']:>10.0f}"
            f"{row['throughput_vs_plain']:>14.2f}{mem:>11}{mem_ratio:>13}"
        )
    middle_fraction = 1.0 / ratios["trace_middle_layer"]
    print(
        f"middle layer ({middle} of {geometry.n_layers}) trace takes {middle_fraction:.2f}x the time of a full "
        f"plain pass (ideal ~{(middle + 1) / geometry.n_layers:.2f}: the pass stops after layer {middle})"
    )
    trace_row = rows[1]
    memory_ratio = trace_row["memory_vs_plain"]
    memory_text = "n/a" if memory_ratio is None else f"{memory_ratio:.2f}x"
    print(
        f"targets: last-layer trace throughput >= 0.95x plain: {trace_row['throughput_vs_plain']:.2f}x; "
        f"peak memory <= 1.1x plain: {memory_text}"
    )
    print(
        "memory = peak resident memory of one pass on top of the loaded model, fresh subprocess per variant, "
        "glibc mmap threshold 64 KiB (freed tensors go back to the OS); peak reset via /proc/self/clear_refs"
    )
    if args.json_path:
        payload = {
            "model": args.model,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "repeats": args.repeats,
            "n_layers": geometry.n_layers,
            "middle_layer": middle,
            "max_abs_score_diff": max_diff,
            "middle_layer_time_fraction": middle_fraction,
            "rows": rows,
            "times_s": times,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        }
        Path(args.json_path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json_path}")


if __name__ == "__main__":
    main()

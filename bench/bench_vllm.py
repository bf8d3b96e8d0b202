"""Generation throughput of `--backend vllm` on the CPU: vLLM's CPU build against HF, paired in one run.

Run it with the vLLM environment's python (`make setup-vllm` builds .venv-vllm):

    .venv-vllm/bin/python bench/bench_vllm.py [--n-prompts 32] [--thinking 64] [--answer 32]
        [--batch-sizes 1,8,32] [--repeats 3] [--json OUT]

The engine runs in vLLM's default mode, a separate engine-core process, unless
VLLM_ENABLE_V1_MULTIPROCESSING=0 is set (then it runs in this process); the mode that ran is printed.
vLLM's own log lines are hidden (VLLM_LOGGING_LEVEL=ERROR) unless VLLM_LOGGING_LEVEL is set.

All sides run on the embedded model (`load_model("default", device="cpu")`, float32; the engine loads
`embedded_checkpoint()`), greedy, on the same `demo:harmless` prompts, ordered longest first (as
`generate_records` orders them) and cut into the same batches; batch = prompts handed to one
`generate` call (`GenerationConfig.batch_size` for the two project paths):

1. engine start-up: the seconds to construct one `vllm.LLM` with the project's settings
   (`VLLMBackend(loaded, BackendConfig(backend="vllm")).engine`: `enforce_eager=True` and the sized
   `kv_cache_memory_bytes` of `VLLMBackend.cpu_settings`, prefix caching on), reported on its own and
   not counted in any tokens/s. That one engine serves (c) and (d).
2. tokens/s at each batch size for
   (a) plain HF: one `model.generate` per batch with the total budget (thinking + answer) and EOS as
       the only stop (`bench_generation.run_plain`, single phase);
   (b) the HF backend: `generate_records` with the default `HFBackend` (two phases);
   (c) bare vLLM: `vllm.LLM.generate` doing the same two-phase work as the project's path: the thinking
       phase (same token ids, same budget, stop string = the thinking-end marker kept in the output,
       the same EOS ids as stop ids), then the answer phase on prompt + thinking (`clean_thinking`) +
       end template, with the answer budget. One shared `SamplingParams` per phase, vLLM's defaults
       otherwise; prompts are tokenised with the HF tokenizer inside the timing, as the backend does;
   (d) the project's path: `generate_records(..., backend=VLLMBackend(loaded, BackendConfig(backend=
       "vllm"), engine=<the engine of (c)>))`.
   Tokens: generated ids without the final EOS, each side counting its own output ((c) and (d) should
   agree exactly; the row says whether they do). The prefix cache is reset before every timed vLLM
   run, so no run reads the KV cache an earlier run filled (within a run the answer phase does reuse
   the thinking phase's cache: that is the backend's design). Repeats are interleaved (a, b, c, d,
   a, b, ...) after one small warm-up call per side, and medians reported. Ratios printed per batch:
   HF backend / plain generate (target >= 0.97 at batch 8), vLLM path / bare vLLM (target >= 0.95),
   vLLM path / HF backend.
3. uneven work: the cliff organism (`load_model("organism", device="cpu")`, when it is built), whose
   thinkings end at `</think>` at different lengths, on harmful and harmless demo prompts in turn, at
   the largest batch size with `--uneven-thinking` as the thinking budget: the vLLM path against the HF
   backend, on a second engine started after the first is shut down (its start-up printed too).

Also printed: the date, `os.getloadavg()` at start and end, torch threads, vLLM's version and mode.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generation import run_plain  # noqa: E402

from refusal_cliff.compute.backends import VLLMBackend  # noqa: E402
from refusal_cliff.compute.generation import HFBackend, generate_records  # noqa: E402
from refusal_cliff.core.config import BackendConfig, GenerationConfig  # noqa: E402
from refusal_cliff.core.data import load_prompts  # noqa: E402
from refusal_cliff.core.models import load_model  # noqa: E402
from refusal_cliff.core.templates import clean_thinking, detect_thinking_template, generation_prompt  # noqa: E402

VLLM = BackendConfig(backend="vllm")


def longest_first(texts: list[str]) -> list[int]:
    """The order `generate_records` runs prompts in (longest text first)."""
    return sorted(range(len(texts)), key=lambda i: -len(texts[i]))


def n_generated(token_ids, eos_ids) -> int:
    ids = list(token_ids)
    return len(ids) - 1 if ids and ids[-1] in eos_ids else len(ids)


def run_records(loaded, prompts, config, backend=None) -> tuple[float, int, list[dict]]:
    start = time.perf_counter()
    records = list(generate_records(loaded, prompts, config, backend=backend, progress=False))
    elapsed = time.perf_counter() - start
    return elapsed, sum(r["thinking_tokens"] + r["answer_tokens"] for r in records), records


def run_bare(engine, tokenizer, texts, batch_size, thinking, answer, template, eos_ids) -> tuple[float, int]:
    """Bare `vllm.LLM.generate`, two phases per batch: thinking (stop at the end marker), then answer."""
    from vllm import SamplingParams

    def ids(text):
        return {"prompt_token_ids": tokenizer(text, add_special_tokens=False)["input_ids"]}

    think = SamplingParams(
        max_tokens=thinking,
        temperature=0.0,
        stop=[template.end_marker],
        include_stop_str_in_output=True,
        stop_token_ids=list(eos_ids),
    )
    reply = SamplingParams(max_tokens=answer, temperature=0.0, stop_token_ids=list(eos_ids))
    start, produced = time.perf_counter(), 0
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        thoughts = engine.generate([ids(t) for t in chunk], think, use_tqdm=False)
        follow = []
        for text, thought in zip(chunk, thoughts):
            out = thought.outputs[0]
            produced += n_generated(out.token_ids, eos_ids)
            follow.append(text + clean_thinking(out.text, template) + template.end_template)
        answers = engine.generate([ids(t) for t in follow], reply, use_tqdm=False)
        produced += sum(n_generated(a.outputs[0].token_ids, eos_ids) for a in answers)
    return time.perf_counter() - start, produced


def start_engine(loaded) -> tuple[VLLMBackend, object, float]:
    """The engine the project would start for `loaded` (its owner backend, the engine, seconds to start)."""
    owner = VLLMBackend(loaded, VLLM)
    start = time.perf_counter()
    engine = owner.engine
    return owner, engine, time.perf_counter() - start


def engine_mode(engine) -> str:
    import vllm.envs

    core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
    kind = type(core).__name__ if core is not None else "?"
    where = "separate engine process" if vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING else "in this process"
    return f"{where} (VLLM_ENABLE_V1_MULTIPROCESSING={int(vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING)}, {kind})"


def median(values) -> float:
    return statistics.median(values)


def load_now() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-prompts", type=int, default=32)
    parser.add_argument("--thinking", type=int, default=64)
    parser.add_argument("--answer", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--uneven-thinking", type=int, default=128, help="thinking budget of the organism part (uneven work)"
    )
    parser.add_argument("--no-uneven", action="store_true", help="skip the organism part")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if min(args.thinking, args.answer, args.uneven_thinking, args.n_prompts, args.repeats) < 1:
        parser.error("--n-prompts, --thinking, --answer, --uneven-thinking and --repeats must be >= 1")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    started = datetime.datetime.now().astimezone()
    load_start = load_now()
    print(f"date {started.isoformat(timespec='seconds')} | load average at start {load_start}", flush=True)

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # before vLLM's logger is set up on import
    tick = time.perf_counter()
    import vllm

    import_seconds = time.perf_counter() - tick
    threads_before = torch.get_num_threads()

    loaded = load_model("default", device="cpu")
    tokenizer = loaded.tokenizer
    eos_ids = HFBackend(loaded).eos_ids
    prompts = load_prompts("demo:harmless", limit=args.n_prompts)
    if len(prompts) < args.n_prompts:
        print(f"note: demo:harmless has {len(prompts)} prompts, not {args.n_prompts}", flush=True)
    template = detect_thinking_template(tokenizer)
    texts = [generation_prompt(tokenizer, template, p["prompt"]) for p in prompts]
    ordered = [texts[i] for i in longest_first(texts)]

    owner, engine, startup = start_engine(loaded)
    mode = engine_mode(engine)
    threads_after = torch.get_num_threads()
    print(
        f"vLLM {vllm.__version__}: engine start-up {startup:.1f} s (import {import_seconds:.1f} s), "
        f"{mode}; model {loaded.model_id} float32; torch threads {threads_before}"
        + (f" (after the engine started: {threads_after})" if threads_after != threads_before else ""),
        flush=True,
    )
    path = VLLMBackend(loaded, VLLM, engine=engine)

    # warm-up: one small call per side (first-call allocations), not timed
    warm = GenerationConfig(max_thinking_tokens=2, max_answer_tokens=2, batch_size=1)
    run_plain(loaded, ordered[:1], 1, 4)
    run_records(loaded, prompts[:1], warm)
    run_bare(engine, tokenizer, ordered[:1], 1, 2, 2, template, eos_ids)
    run_records(loaded, prompts[:1], warm, backend=path)

    results = []
    for batch_size in batch_sizes:
        config = GenerationConfig(
            max_thinking_tokens=args.thinking, max_answer_tokens=args.answer, batch_size=batch_size
        )
        runs: dict[str, list[tuple[float, int]]] = {"plain": [], "hf": [], "bare": [], "path": []}
        for _ in range(args.repeats):
            runs["plain"].append(run_plain(loaded, ordered, batch_size, args.thinking + args.answer))
            runs["hf"].append(run_records(loaded, prompts, config)[:2])
            engine.reset_prefix_cache()
            runs["bare"].append(
                run_bare(
                    engine, tokenizer, ordered, batch_size, args.thinking, args.answer, template, eos_ids
                )
            )
            engine.reset_prefix_cache()
            runs["path"].append(run_records(loaded, prompts, config, backend=path)[:2])
        row: dict = {"batch_size": batch_size}
        for side, pairs in runs.items():
            row[f"{side}_tok_s"] = median(tokens / seconds for seconds, tokens in pairs)
            row[f"{side}_tokens"] = [tokens for _, tokens in pairs]
            row[f"{side}_seconds"] = [round(seconds, 3) for seconds, _ in pairs]
        row["hf_over_plain"] = row["hf_tok_s"] / row["plain_tok_s"]
        row["path_over_bare"] = row["path_tok_s"] / row["bare_tok_s"]
        row["path_over_hf"] = row["path_tok_s"] / row["hf_tok_s"]
        row["bare_path_same_tokens"] = row["bare_tokens"] == row["path_tokens"]
        results.append(row)
        print(
            f"batch {batch_size:>2}: plain generate {row['plain_tok_s']:7.1f} | HF backend {row['hf_tok_s']:7.1f} "
            f"| bare vLLM {row['bare_tok_s']:7.1f} | vLLM path {row['path_tok_s']:7.1f} tok/s || "
            f"HF backend/plain {row['hf_over_plain']:.2f}x, vLLM path/bare {row['path_over_bare']:.2f}x, "
            f"vLLM path/HF backend {row['path_over_hf']:.2f}x"
            + ("" if row["bare_path_same_tokens"] else " (bare and path generated different token counts)"),
            flush=True,
        )
    owner.close()
    del engine, path

    uneven = run_uneven(args, max(batch_sizes)) if not args.no_uneven else None

    load_end = load_now()
    print("summary (targets: HF backend/plain >= 0.97 at batch 8; vLLM path/bare vLLM >= 0.95):", flush=True)
    for row in results:
        print(
            f"  batch {row['batch_size']:>2}: HF backend/plain {row['hf_over_plain']:.2f}x | "
            f"vLLM path/bare vLLM {row['path_over_bare']:.2f}x | vLLM path/HF backend {row['path_over_hf']:.2f}x",
            flush=True,
        )
    if uneven:
        print(
            f"  uneven work (organism, batch {uneven['batch_size']}): vLLM path/HF backend "
            f"{uneven['path_over_hf']:.2f}x",
            flush=True,
        )
    finished = datetime.datetime.now().astimezone()
    print(
        f"date {finished.isoformat(timespec='seconds')} | load average at end {load_end} | "
        f"took {(finished - started).total_seconds():.0f} s",
        flush=True,
    )
    report = {
        "date": started.isoformat(timespec="seconds"),
        "load_average_start": load_start,
        "load_average_end": load_end,
        "seconds": round((finished - started).total_seconds(), 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": loaded.model_id,
        "dtype": "float32",
        "device": "cpu",
        "torch_threads": threads_before,
        "torch_threads_after_engine_start": threads_after,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "vllm_version": vllm.__version__,
        "vllm_mode": mode,
        "engine_startup_s": round(startup, 2),
        "vllm_import_s": round(import_seconds, 2),
        "n_prompts": len(prompts),
        "thinking_budget": args.thinking,
        "answer_budget": args.answer,
        "repeats": args.repeats,
        "results": results,
        "uneven": uneven,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def run_uneven(args, batch_size: int) -> dict | None:
    """The organism part: thinkings of different lengths in one batch, the vLLM path against the HF backend."""
    from refusal_cliff.stages.organism import cached_organism_folder

    if cached_organism_folder() is None:
        print(
            "uneven work: skipped, the organism is not built (`refusal-cliff organism` builds it)", flush=True
        )
        return None
    loaded = load_model("organism", device="cpu")
    harmful = load_prompts("demo:harmful", limit=args.n_prompts)
    harmless = load_prompts("demo:harmless", limit=args.n_prompts)
    mixed = [p for pair in zip(harmful, harmless) for p in pair][: args.n_prompts]
    config = GenerationConfig(
        max_thinking_tokens=args.uneven_thinking, max_answer_tokens=args.answer, batch_size=batch_size
    )
    owner, engine, startup = start_engine(loaded)
    path = VLLMBackend(loaded, VLLM, engine=engine)
    warm = GenerationConfig(max_thinking_tokens=2, max_answer_tokens=2, batch_size=1)
    run_records(loaded, mixed[:1], warm)
    run_records(loaded, mixed[:1], warm, backend=path)
    hf, vl, records = [], [], []
    for _ in range(args.repeats):
        hf.append(run_records(loaded, mixed, config)[:2])
        engine.reset_prefix_cache()
        seconds, tokens, records = run_records(loaded, mixed, config, backend=path)
        vl.append((seconds, tokens))
    owner.close()
    lengths = sorted(r["thinking_tokens"] for r in records)
    ends = {end: sum(r["thinking_end"] == end for r in records) for end in ("marker", "eos", "budget")}
    row = {
        "batch_size": batch_size,
        "n_prompts": len(mixed),
        "thinking_budget": args.uneven_thinking,
        "answer_budget": args.answer,
        "engine_startup_s": round(startup, 2),
        "hf_tok_s": median(tokens / seconds for seconds, tokens in hf),
        "path_tok_s": median(tokens / seconds for seconds, tokens in vl),
        "hf_tokens": [tokens for _, tokens in hf],
        "path_tokens": [tokens for _, tokens in vl],
        "thinking_tokens": {"min": lengths[0], "median": median(lengths), "max": lengths[-1]},
        "thinking_end": ends,
    }
    row["path_over_hf"] = row["path_tok_s"] / row["hf_tok_s"]
    print(
        f"uneven work (organism, {len(mixed)} prompts, batch {batch_size}, engine start-up {startup:.1f} s; "
        f"thinking tokens min {lengths[0]} / median {median(lengths):g} / max {lengths[-1]}, ends {ends}): "
        f"HF backend {row['hf_tok_s']:7.1f} | vLLM path {row['path_tok_s']:7.1f} tok/s || "
        f"vLLM path/HF backend {row['path_over_hf']:.2f}x",
        flush=True,
    )
    return row


if __name__ == "__main__":
    main()

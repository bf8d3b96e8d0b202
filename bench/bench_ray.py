"""Benchmark: trace throughput with the local executor vs Ray Data with 2 CPU workers (issue 9).

Both run `trace.trace_into` on the same records with the embedded model (SmolLM2-135M) and a prober
at its last layer, into fresh folders, paired: each repeat runs both, in a rotating order. The local
executor runs in this process with as many torch threads as workers; the Ray executor runs the same
`trace_records` per shard on `--workers` actors of one torch thread each, which load the model once
(that load is inside the Ray timing), write shard files, and the driver writes the artifacts from them.

Ray's start-up (`ray.init` of a local cluster on 127.0.0.1) is measured once, separately: it is paid
once per command, not per example. So is the workers' start-up (actor processes, torch, the model load,
Ray Data's plan), measured in each repeat as the same Ray run on one record per worker; the ratio
"beyond the workers' start-up" takes it out of the Ray time. On one machine the target is >= 0.9x the
local throughput (nothing lost to the engine beyond serialisation); the speed-up comes from more machines.

    PYTHONPATH=src python bench/bench_ray.py [--n-records 64 --workers 2 --repeats 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parent.parent / "src"
sys.path.insert(0, str(SRC))

from refusal_cliff.compute.executors import RayExecutor  # noqa: E402
from refusal_cliff.compute.prober import Prober  # noqa: E402
from refusal_cliff.compute.tracing import trace_into  # noqa: E402
from refusal_cliff.core.config import ExecutorConfig, ModelConfig  # noqa: E402
from refusal_cliff.core.models import load_model  # noqa: E402
from refusal_cliff.core.templates import probing_tokens  # noqa: E402


def make_records(tokenizer, n: int) -> list[dict]:
    records = []
    for index in range(n):
        prompt = f"Explain, step by step, how topic number {index} works and why it matters."
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        thinking = "Let me think about this carefully and consider each part. " * (8 + index % 8)
        records.append(
            {
                "id": f"b{index:04d}",
                "prompt": prompt,
                "system_prompt": None,
                "generation_prompt": text + "<think>\n",
                "thinking": thinking,
                "end_template": "\n</think>\n\n",
                "answer": "ok",
            }
        )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-records", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    loaded = load_model("default", device="cpu")
    torch.manual_seed(0)
    geometry = loaded.adapter.geometry(loaded.model)
    linear = torch.nn.Linear(geometry.d_model, 1).requires_grad_(False)
    prober = Prober(linear, layer=geometry.n_layers - 1, metadata={})
    records = make_records(loaded.tokenizer, args.n_records)
    n_tokens = sum(len(probing_tokens(loaded.tokenizer, r)[0]) for r in records)
    shard_size = args.batch_size * 4  # a few shards per worker, so that both stay busy

    started = time.perf_counter()
    ray.init(
        num_cpus=args.workers,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    ray_start = time.perf_counter() - started

    executor = RayExecutor(
        ExecutorConfig(executor="ray", workers=args.workers, shard_size=shard_size),
        ModelConfig(model="default", device="cpu"),
    )
    # the workers' start-up (actor processes, torch import, model load, Ray Data's plan): the same Ray run
    # on one record per worker, which is almost nothing but that fixed cost
    warm_up = RayExecutor(
        ExecutorConfig(executor="ray", workers=args.workers, shard_size=1),
        ModelConfig(model="default", device="cpu"),
    )
    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    times: dict[str, list[float]] = {"local": [], "ray": [], "start_up": []}
    try:
        for repeat in range(args.repeats):
            order = ["local", "ray", "start_up"] if repeat % 2 == 0 else ["start_up", "ray", "local"]
            for variant in order:
                if variant == "start_up":
                    torch.set_num_threads(1)
                    begin = time.perf_counter()
                    trace_into(
                        loaded,
                        prober,
                        records[: args.workers],
                        root / f"start-{repeat}",
                        batch_size=1,
                        progress=False,
                        executor=warm_up,
                    )
                    times["start_up"].append(time.perf_counter() - begin)
                    shutil.rmtree(root / f"start-{repeat}")
                    continue
                out = root / f"{variant}-{repeat}"
                torch.set_num_threads(args.workers if variant == "local" else 1)
                begin = time.perf_counter()
                trace_into(
                    loaded,
                    prober,
                    records,
                    out,
                    batch_size=args.batch_size,
                    progress=False,
                    executor=executor if variant == "ray" else None,
                )
                times[variant].append(time.perf_counter() - begin)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        ray.shutdown()

    local, distributed = statistics.median(times["local"]), statistics.median(times["ray"])
    ratios = [lt / rt for lt, rt in zip(times["local"], times["ray"])]
    start_up = statistics.median(times["start_up"])
    # what Ray costs beyond its once-per-command start-up: the same run with that fixed cost taken out
    steady = [lt / (rt - st) for lt, rt, st in zip(times["local"], times["ray"], times["start_up"])]
    result = {
        "n_records": args.n_records,
        "n_tokens": n_tokens,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "shard_size": shard_size,
        "local_s": local,
        "ray_s": distributed,
        "local_tokens_per_s": n_tokens / local,
        "ray_tokens_per_s": n_tokens / distributed,
        "ratio_ray_over_local": statistics.median(ratios),
        "ray_init_s": ray_start,
        "workers_start_up_s": start_up,
        "ratio_beyond_start_up": statistics.median(steady),
        "repeats": times,
    }
    print(
        f"trace of {args.n_records} records ({n_tokens} tokens), batch {args.batch_size}, embedded model, "
        f"prober at the last layer"
    )
    print(f"  local executor ({args.workers} torch threads): {local:6.2f} s  {n_tokens / local:7.1f} tok/s")
    print(
        f"  Ray, {args.workers} CPU workers x 1 thread:   {distributed:6.2f} s  {n_tokens / distributed:7.1f} tok/s "
        "(workers' model load included)"
    )
    print(f"  ratio Ray / local throughput: {result['ratio_ray_over_local']:.2f}x  (target >= 0.9x)")
    print(f"  Ray start-up (ray.init, local cluster), once per command: {ray_start:.1f} s")
    print(
        f"  workers' start-up (processes, model load, Ray Data's plan; one record per worker), once per "
        f"command: {start_up:.1f} s"
    )
    print(f"  ratio beyond the workers' start-up: {result['ratio_beyond_start_up']:.2f}x  (target >= 0.9x)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

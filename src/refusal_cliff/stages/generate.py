"""The `generate` stage: the model's thinking and answer for every prompt, resumable, into
`generations.jsonl` (the machinery is `compute.generation` and `compute.backends`)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from refusal_cliff.compute.backends import backend_info, generation_backend
from refusal_cliff.compute.generation import check_prompts_fit, generate_records, prompts_digest
from refusal_cliff.core.config import GenerationConfig
from refusal_cliff.core.runs import JsonlWriter, RunFolder, completed_ids, read_jsonl, write_jsonl

logger = logging.getLogger(__name__)


def run_generate(
    loaded,
    prompts: Sequence[dict],
    config: GenerationConfig,
    out_dir: str | Path,
    overwrite: bool = False,
    progress: bool = True,
    source: str | None = None,
    backend=None,
) -> Path:
    """The `generate` stage: writes `generations.jsonl` + `metadata.json`, resuming a killed run.

    `backend`: a `config.BackendConfig` (default: HF generate in this process); metadata.json records
    the backend and its version. Returns the path of generations.jsonl.
    """
    stage_config = {
        "model": loaded.model_id,
        "revision": loaded.revision,
        "dtype": str(next(loaded.model.parameters()).dtype),
        "prompts": source,
        "prompts_digest": prompts_digest(prompts),
        "n_prompts": len(prompts),
        **config.to_dict(),
    }
    if (
        backend is not None and backend.backend != "hf"
    ):  # only then, so that earlier runs keep their fingerprint
        stage_config["backend"] = backend.backend
    context = backend.max_model_len if backend is not None else None  # None with hf (BackendConfig checks)
    template = check_prompts_fit(loaded, prompts, config, context)  # before anything is written
    run = RunFolder(
        out_dir,
        "generate",
        stage_config,
        overwrite=overwrite,
        artifacts=["generations.jsonl", "labels.jsonl", "metadata.label.json"],
    )
    target = run.path("generations.jsonl")
    with run.start(
        model_id=loaded.model_id,
        revision=loaded.revision,
        seed=config.seed,
        extra={"backend": backend_info(backend)},
    ):
        done = completed_ids(target) if run.resumed else set()
        pending = [p for p in prompts if str(p["id"]) not in done]
        if done:
            logger.info("resuming: %d of %d examples already generated", len(done), len(prompts))
        started, n_tokens = time.perf_counter(), 0
        # the engine (a vLLM one holds its memory until shut down) lives only while there is work
        with generation_backend(loaded, backend) if pending else contextlib.nullcontext() as engine:
            with JsonlWriter(target) as writer:
                for record in generate_records(loaded, pending, config, template, engine, progress=progress):
                    writer.write(record)
                    n_tokens += record["thinking_tokens"] + record["answer_tokens"]
        # written as batches finished (longest prompts first); once complete, put them in prompt order
        order = {str(p["id"]): index for index, p in enumerate(prompts)}
        write_jsonl(target, sorted(read_jsonl(target), key=lambda r: order.get(str(r["id"]), len(order))))
        seconds = time.perf_counter() - started
        run.finish(
            {
                "thinking_template": template.to_dict(),
                "n_examples": len(prompts),
                "throughput": {
                    "examples": len(pending),
                    "generated_tokens": n_tokens,
                    "seconds": round(seconds, 3),
                    "tokens_per_second": round(n_tokens / seconds, 2) if n_tokens else None,
                },
            }
        )
    return target

"""The `clip` stage, the cliff's second property (paper §3, Figure 5, right): thinking clipping.

The thinking of harmful examples cut to fractions of its tokens, the end template appended (the
paper's "thinking clipping"), the answer regenerated, labelled and traced (does less thinking mean a
smaller cliff and more refusals?). The layer-wise study is `stages/layers.py`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from refusal_cliff.compute.backends import backend_info, generation_backend
from refusal_cliff.compute.generation import generate_answers
from refusal_cliff.compute.labeling import KeywordLabeler, label_records, read_generations
from refusal_cliff.compute.tracing import CLIPPING, clip_thinking_records, clipping_summary, trace_into
from refusal_cliff.core.config import Config, GenerationConfig, option, parse_floats
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.runs import RunFolder, file_digest, read_json, read_jsonl, write_json, write_jsonl


@dataclass
class ClipConfig(Config):
    """The thinking-clipping study (Figure 5, right)."""

    fractions: tuple[float, ...] = option(
        (0.0, 0.25, 0.5, 0.75, 1.0),
        "Fractions of the thinking's tokens kept before the end template is appended.",
        parse=parse_floats,
        min=0.0,
        max=1.0,
    )
    limit: int | None = option(None, "Use the first N examples.", type=int, min=1)
    max_answer_tokens: int = option(96, "Answer budget of the regenerated answers.", min=1)
    batch_size: int = option(8, "Sequences per batch.", min=1)

    def validate(self) -> None:
        if not self.fractions:
            raise UserError("--fractions is empty: give fractions of the thinking in [0, 1], e.g. 0,0.5,1")


def run_clip(
    loaded,
    prober,
    generations: str | Path,
    out_dir: str | Path,
    config=None,
    overwrite: bool = False,
    backend=None,
) -> list[dict]:
    """The `clip` stage: clip each record's thinking at each fraction, regenerate and label the answer,
    trace it. Writes `generations.jsonl`, `labels.jsonl`, `trace/`, `clipping.json` and `metadata.json`;
    returns the clipping summary (one row per fraction).

    `backend`: a `config.BackendConfig` for the regenerated answers (default HF); a vLLM engine is
    shut down before the trace. metadata.json records the backend and its version.
    """
    config = config or ClipConfig()
    config.validate()
    records = read_generations(generations)
    records = records[: config.limit] if config.limit else records
    out = Path(out_dir)
    stage_config = {
        "model": loaded.model_id,
        "revision": loaded.revision,
        **config.to_dict(),
        "generations": str(generations),
        "digest": file_digest(generations),
        "prober": prober.fingerprint(),
    }
    stage_config.pop("batch_size")
    if backend is not None and backend.backend != "hf":  # only then: earlier runs keep their fingerprint
        stage_config["backend"] = backend.backend
    artifacts = ["generations.jsonl", "labels.jsonl", "trace", CLIPPING]
    run = RunFolder(out, "clip", stage_config, overwrite=overwrite, artifacts=artifacts)
    if run.is_finished() and (out / CLIPPING).is_file():
        return read_json(out / CLIPPING)
    extra = {"prober": prober.summary(), "backend": backend_info(backend)}
    with run.start(model_id=loaded.model_id, revision=loaded.revision, extra=extra):
        clipped = clip_thinking_records(loaded.tokenizer, records, config.fractions)
        with generation_backend(loaded, backend) as answers:
            answered = generate_answers(
                loaded,
                clipped,
                GenerationConfig(max_answer_tokens=config.max_answer_tokens, batch_size=config.batch_size),
                answers,
            )
        labels = label_records(answered, KeywordLabeler(), loaded.tokenizer)
        write_jsonl(out / "generations.jsonl", answered)
        write_jsonl(out / "labels.jsonl", labels)
        shutil.rmtree(out / "trace", ignore_errors=True)  # cheap to redo; never mix with stale traces
        trace_into(loaded, prober, answered, out / "trace", None, batch_size=config.batch_size)
        summary = clipping_summary(
            read_jsonl(out / "trace" / "cliff.jsonl"), {label["id"]: label["refusal"] for label in labels}
        )
        write_json(out / CLIPPING, summary)
        run.finish({"n_examples": len(records)})
    return summary

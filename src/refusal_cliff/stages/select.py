"""Cliff-as-a-Judge: score safety-training candidates by their refusal cliff, pick the top k, export SFT data.

The paper's section 5: a poorly aligned reasoning model often *knows* it should
refuse (its refusal score plateaus high while it thinks) and the intention is
suppressed only at the last tokens. The examples where the drop is deepest,
ranked by the misalignment score `MS = plateau - final`, are the ones worth
training on: 700 of 40k WildJailbreak examples matched full-data training.

This module holds the three steps between a candidate file and a training set:

1. `load_candidates`: WildJailbreak-style files (`vanilla` / `adversarial`,
   `completion`, `data_type`) or plain `prompt` + `response` files.
2. `score_candidates`: the model thinks on each prompt (unless the candidate
   brings its own thinking) and answers; the probing sequence is traced with the
   prober and `MS` computed. Streamed to `generations.jsonl` and `scores.jsonl`
   and resumable, so that tens of thousands of candidates fit in one run.
3. `select` + `export_selection`: top-k by `MS`, or a baseline (random, rule,
   judge, full), deterministic under a seed with ties broken by id; the SFT
   target is the model's own thinking + the thinking-end template + the safe
   reference response, written for TRL and for LLaMA-Factory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path

from tqdm.auto import tqdm

from refusal_cliff.compute.backends import backend_info, generation_backend
from refusal_cliff.compute.executors import ShardJob, run_job, write_rows_shard
from refusal_cliff.compute.generation import generate_answers, generate_records
from refusal_cliff.compute.labeling import KeywordLabeler
from refusal_cliff.compute.tracing import cliff_metrics, trace_records
from refusal_cliff.core.config import Config, GenerationConfig, option
from refusal_cliff.core.data import read_rows
from refusal_cliff.core.errors import UserError, require_regular_file
from refusal_cliff.core.runs import (
    SCHEMA_VERSION,
    JsonlWriter,
    RunFolder,
    chunked,
    completed_ids,
    fingerprint,
    package_versions,
    read_jsonl,
    write_json,
    write_jsonl,
)
from refusal_cliff.core.templates import build_messages, detect_thinking_template, generation_prompt


@dataclass
class ScoreConfig(Config):
    """How Cliff-as-a-Judge scores candidates."""

    generation: GenerationConfig = option(
        help="Thinking/answer budgets, batch size.", factory=GenerationConfig, cli=False
    )
    chunk_size: int = option(64, "Candidates generated and traced per step (the unit of resumption).", min=1)
    plateau: str = option(
        "max",
        "Plateau over the thinking region: max of the 8-token moving average, or mean.",
        choices=("max", "mean"),
    )

    def to_dict(self) -> dict:
        return {
            "generation": self.generation.to_dict(),
            "chunk_size": self.chunk_size,
            "plateau": self.plateau,
        }


@dataclass
class SelectConfig(Config):
    """Which candidates `select` keeps."""

    method: str = option(
        "cliff",
        "cliff = top-k by misalignment score; the others are the paper's baselines.",
        choices=("cliff", "random", "rule", "judge", "full"),
    )
    k: str = option("all", "How many to select: a count (700), a fraction (0.017) or 'all'.")
    limit: int | None = option(None, "Score only the first N candidates.", type=int, min=1)
    judge: str | None = option(
        None, "LlamaGuard-style judge model (hub id or folder); needed by --method judge.", type=str
    )

    def validate(self) -> None:
        check_k(self.k)
        if self.method == "judge" and not self.judge:
            raise UserError(
                "--method judge needs a judge model: pass --judge MODEL (e.g. a LlamaGuard checkpoint)"
            )


def _score_compute(loaded, records, progress=False, *, prober, config):
    return trace_scores(loaded, prober, records, config)


def score_job(prober, config) -> ShardJob:
    """`select`'s scoring shards: `select.trace_scores` per shard, JSONL files of score rows."""
    return ShardJob(
        "score",
        partial(_score_compute, prober=prober, config=config),
        write_rows_shard,
        read_jsonl,
        lambda row: str(row["id"]),
        ".jsonl",
    )


logger = logging.getLogger(__name__)

METHODS = ("cliff", "random", "rule", "judge", "full")
DEMO_CANDIDATES = "demo:candidates"
PROMPT_COLUMNS = ("prompt", "vanilla", "instruction", "question", "goal")
# Only columns that hold a SAFE reference response. AdvBench's `target` ("Sure, here is ...") is an
# attack target and must never become a fine-tuning response, so it is not on this list.
RESPONSE_COLUMNS = ("completion", "response", "safe_response", "refusal")
# columns that must hold text where they hold anything ("refusal" may be another dataset's boolean)
TEXT_COLUMNS = {*PROMPT_COLUMNS, "adversarial", "completion", "response", "safe_response", "thinking"}
_SENTINEL = "\x01ASSISTANT\x01"

# -- candidates ------------------------------------------------------------------------


def _candidate_rows(source: str) -> list[dict]:
    """The raw records of a candidate file (or the built-in set)."""
    if source == DEMO_CANDIDATES:
        text = resources.files("refusal_cliff.resources").joinpath("demo_candidates.jsonl").read_text("utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    path = Path(source).expanduser()
    require_regular_file(path, f"pass a .jsonl/.json/.csv/.parquet candidate file or {DEMO_CANDIDATES}")
    return read_rows(path)


def _first_present(row: dict, lowered: dict[str, str], names: Sequence[str]) -> str | None:
    for name in names:
        key = lowered.get(name)
        value = row.get(key) if key else None
        if isinstance(value, str) and value.strip():
            return value
    return None


def load_candidates(source: str, limit: int | None = None) -> list[dict]:
    """Load a candidate set of harmful prompts with safe reference responses.

    Columns are detected case-insensitively. The prompt is `adversarial` when that column is
    non-empty (WildJailbreak's adversarial rows), else the first of `prompt`, `vanilla`,
    `instruction`, `question`, `goal`; the response is the first of `completion`, `response`,
    `safe_response`, `refusal` (never AdvBench's `target`: an attack target, not a safe response).
    A `thinking` column, when present, is used as the model's thinking instead of generating it.

    Args:
        source: a file path or `demo:candidates` (the built-in set of 40).
        limit: keep the first `limit` candidates.

    Returns:
        Dicts with `id` (the file's id, else "<file stem>-<row>"), `prompt`, `response`,
        `data_type`, optional `thinking`, and the file's other columns.
    """
    rows = _candidate_rows(source)
    if not rows or not isinstance(rows[0], dict):
        raise UserError(f"{source} holds no candidate records")
    lowered = {str(c).lower().strip(): c for c in rows[0]}
    if not any(name in lowered for name in (*PROMPT_COLUMNS, "adversarial")):
        raise UserError(
            f"{source}: no prompt column ({', '.join(PROMPT_COLUMNS)}, adversarial); "
            f"its columns are {', '.join(map(str, rows[0]))}"
        )
    if not any(name in lowered for name in RESPONSE_COLUMNS):
        raise UserError(
            f"{source}: no safe-response column ({', '.join(RESPONSE_COLUMNS)}); "
            f"its columns are {', '.join(map(str, rows[0]))}"
        )
    # ids without an id column: "<file stem>-<row>", as `generate` names prompts
    prefix = source.split(":", 1)[-1] if source == DEMO_CANDIDATES else Path(source).stem
    candidates, skipped = [], 0
    for index, row in enumerate(rows):
        for key, value in row.items():  # a number or a list in a text column is refused, never skipped
            if str(key).lower().strip() in TEXT_COLUMNS and value is not None and not isinstance(value, str):
                raise UserError(
                    f"{source}: record {index + 1} (id {row.get('id', index)!r}) has a {key!r} that is a "
                    f"{type(value).__name__}, not text; fix the file"
                )
        prompt = _first_present(row, lowered, ("adversarial", *PROMPT_COLUMNS))
        response = _first_present(row, lowered, RESPONSE_COLUMNS)
        if prompt is None or response is None:
            skipped += 1
            continue
        candidate = {k: v for k, v in row.items() if v is not None}
        candidate["id"] = str(row["id"]) if row.get("id") not in (None, "") else f"{prefix}-{index}"
        candidate["prompt"] = prompt
        candidate["response"] = response
        candidate["data_type"] = row.get(lowered.get("data_type", "data_type")) or "unknown"
        thinking = row.get(lowered.get("thinking", "thinking"))
        if isinstance(thinking, str) and thinking.strip():
            candidate["thinking"] = thinking
        else:
            candidate.pop("thinking", None)
        candidates.append(candidate)
    if skipped:
        logger.warning("%s: skipped %d rows without a prompt or a response", source, skipped)
    ids = [c["id"] for c in candidates]
    if len(set(ids)) != len(ids):
        raise UserError(f"{source}: the 'id' column has duplicates; make ids unique or drop the column")
    if not candidates:
        raise UserError(f"{source}: no row has both a prompt and a response")
    return candidates[:limit] if limit else candidates


# -- scoring ----------------------------------------------------------------------------


def _records_with_given_thinking(loaded, candidates: Sequence[dict], config: ScoreConfig) -> list[dict]:
    """Generation records for candidates that bring their own thinking: only the answer is generated."""
    settings = config.generation
    template = detect_thinking_template(
        loaded.tokenizer, settings.start_marker, settings.end_marker, settings.end_template
    )
    partial = [
        {
            "id": c["id"],
            "prompt": c["prompt"],
            "system_prompt": settings.system_prompt,
            "generation_prompt": generation_prompt(
                loaded.tokenizer, template, c["prompt"], settings.system_prompt
            ),
            "thinking": c["thinking"],
            "end_template": template.end_template,
            "thinking_tokens": len(loaded.tokenizer(c["thinking"], add_special_tokens=False)["input_ids"]),
            "thinking_clipped": False,
            "thinking_end": "given",
        }
        for c in candidates
    ]
    return generate_answers(loaded, partial, settings)


def _generate(loaded, candidates: Sequence[dict], config: ScoreConfig, backend=None) -> list[dict]:
    given = [c for c in candidates if "thinking" in c]
    fresh = [c for c in candidates if "thinking" not in c]
    records = _records_with_given_thinking(loaded, given, config) if given else []
    if fresh:
        prompts = [{"id": c["id"], "prompt": c["prompt"]} for c in fresh]
        records += list(generate_records(loaded, prompts, config.generation, backend=backend, progress=False))
    return records


def trace_scores(loaded, prober, records: Sequence[dict], config: ScoreConfig) -> Iterator[dict]:
    """`{id, plateau, final, ms, t_cliff, drop}` of each generation record, by tracing its probing
    sequence with the prober (`tracing.trace_records` does the forward passes)."""
    for result in trace_records(loaded, prober, list(records), batch_size=config.generation.batch_size):
        metrics = cliff_metrics(result.scores, result.regions, plateau_method=config.plateau)
        yield {
            "id": str(result.id),
            **{k: _plain(metrics[k]) for k in ("plateau", "final", "ms", "t_cliff", "drop")},
        }


def _plain(value):
    """JSON-safe number: NaN becomes None (e.g. the drop of a sequence that starts with the end template)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def score_candidates(
    loaded,
    prober,
    candidates: Sequence[dict],
    out_dir: str | Path,
    config: ScoreConfig | None = None,
    judge=None,
    overwrite: bool = False,
    source: str | None = None,
    progress: bool = True,
    backend=None,
    executor=None,
) -> list[dict]:
    """Score candidates by their misalignment score, streamed to `out_dir` and resumable.

    Writes `generations.jsonl` (the model's thinking and answer, format of the `generate` stage)
    and `scores.jsonl` (`id, plateau, final, ms, t_cliff, drop, refusal, unsafe`): `refusal` is the
    keyword label of the model's own answer (rule baseline), `unsafe` the judge's verdict (judge
    baseline, null without a judge). Ids already in `scores.jsonl` are skipped; generations
    already written are reused.

    Args:
        loaded: the model being repaired (`models.LoadedModel`).
        prober: a loaded prober (`prober.load_prober`).
        candidates: from `load_candidates`.
        judge: optional `labeling.ModelJudge` for the judge baseline.
        backend: a `config.BackendConfig`: what generates the thinking and answers (default HF).
        executor: where the traces are scored (`executors.make_executor`; default this process). Under
            Ray every pending candidate is generated first (in the same chunks), then all are scored
            on the workers (`shards/score/`), and scores.jsonl is written in candidate order.

    Returns:
        The score rows of all candidates, in candidate order.
    """
    config = config or ScoreConfig()
    stage_config = {
        "model": loaded.model_id,
        "candidates": source,
        "candidates_digest": fingerprint([[c["id"], c["prompt"], c.get("thinking")] for c in candidates]),
        "judge": getattr(judge, "name", None),
        "prober": prober.fingerprint(),
        "plateau": config.plateau,
        # batch and chunk sizes do not change the results: a resumed run may use other ones
        "generation": {k: v for k, v in config.generation.to_dict().items() if k != "batch_size"},
    }
    # a new scoring makes an earlier selection stale: it is replaced with the scores (and restored with
    # them if the new scoring fails)
    if (
        backend is not None and backend.backend != "hf"
    ):  # only then, so that earlier runs keep their fingerprint
        stage_config["backend"] = backend.backend
    run = RunFolder(
        out_dir,
        "score",
        stage_config,
        overwrite=overwrite,
        artifacts=[
            "scores.jsonl",
            "generations.jsonl",
            "selection.jsonl",
            "metadata.select.json",
            "selections",
            TRL_PROMPT_COMPLETION,
            TRL_MESSAGES,
            LLAMAFACTORY_ALPACA,
            LLAMAFACTORY_SHAREGPT,
            LLAMAFACTORY_INFO,
            "shards",
        ],
    )

    extra = {"prober": prober.summary(), "backend": backend_info(backend)}
    if executor is not None:
        extra["executor"] = executor.info()
    with run.start(
        model_id=loaded.model_id, revision=loaded.revision, seed=config.generation.seed, extra=extra
    ):
        vllm = backend is not None and backend.backend != "hf"
        with generation_backend(loaded, backend) if vllm else contextlib.nullcontext() as engine:
            _score_into(loaded, prober, candidates, run, config, judge, progress, engine, executor)
        run.finish({"n_candidates": len(candidates)})
    rows = {r["id"]: r for r in read_jsonl(run.path("scores.jsonl"))}
    return [rows[c["id"]] for c in candidates if c["id"] in rows]


def _score_into(
    loaded,
    prober,
    candidates: Sequence[dict],
    run: RunFolder,
    config: ScoreConfig,
    judge,
    progress: bool,
    backend=None,
    executor=None,
) -> None:
    """Score the candidates not yet in `scores.jsonl`, reusing generations already written."""
    if executor is not None and not executor.local:
        _score_distributed(loaded, prober, candidates, run, config, judge, progress, backend, executor)
        return
    resumed = run.resumed
    scores_path, generations_path = run.path("scores.jsonl"), run.path("generations.jsonl")
    done = completed_ids(scores_path) if resumed else set()
    generated = (
        {r["id"]: r for r in read_jsonl(generations_path, repair=True)}
        if (resumed and generations_path.exists())
        else {}
    )
    pending = [c for c in candidates if c["id"] not in done]
    if done:
        logger.info("resuming: %d of %d candidates already scored", len(done), len(candidates))
    labeler = KeywordLabeler()
    bar = tqdm(total=len(candidates), initial=len(done), desc="score", unit="ex", disable=not progress)
    with JsonlWriter(generations_path) as generation_writer, JsonlWriter(scores_path) as score_writer:
        for chunk in chunked(pending, config.chunk_size):
            missing = [c for c in chunk if c["id"] not in generated]
            for record in _generate(loaded, missing, config, backend) if missing else []:
                generation_writer.write(record)
                generated[record["id"]] = record
            records = [generated[c["id"]] for c in chunk]
            verdicts = judge.judge([(r["prompt"], r.get("answer", "")) for r in records]) if judge else None
            by_id = {r["id"]: r for r in records}
            verdict_of = {r["id"]: v for r, v in zip(records, verdicts)} if verdicts else {}
            for row in trace_scores(loaded, prober, records, config):
                refusal, _ = labeler.label(by_id[row["id"]].get("answer", ""), loaded.tokenizer)
                row["refusal"] = refusal
                row["unsafe"] = (verdict_of[row["id"]] == "unsafe") if verdicts else None
                score_writer.write(row)
                bar.update(1)
            for candidate in chunk:  # memory stays bounded by one chunk, not by the candidate set
                generated.pop(candidate["id"], None)
    bar.close()


def _score_distributed(
    loaded,
    prober,
    candidates: Sequence[dict],
    run: RunFolder,
    config: ScoreConfig,
    judge,
    progress: bool,
    backend,
    executor,
) -> None:
    """`_score_into` on a Ray executor: generate what is missing (same chunks, same generations.jsonl), then
    score every candidate with `trace_scores` on the workers, and write scores.jsonl in candidate order."""
    scores_path, generations_path = run.path("scores.jsonl"), run.path("generations.jsonl")
    done = completed_ids(scores_path) if run.resumed else set()
    generated = (
        {r["id"]: r for r in read_jsonl(generations_path, repair=True)}
        if (run.resumed and generations_path.exists())
        else {}
    )
    pending = [c for c in candidates if c["id"] not in done]
    with JsonlWriter(generations_path) as generation_writer:
        for chunk in chunked(pending, config.chunk_size):
            missing = [c for c in chunk if c["id"] not in generated]
            for record in _generate(loaded, missing, config, backend) if missing else []:
                generation_writer.write(record)
                generated[record["id"]] = record
    records = [generated[c["id"]] for c in candidates if c["id"] in generated]
    labeler = KeywordLabeler()
    with JsonlWriter(scores_path) as score_writer:
        rows = run_job(
            executor,
            loaded,
            score_job(prober, config),
            records,
            run.root,
            config.generation.batch_size,
            fingerprint=run.fingerprint,
            skip=done,
            progress=progress,
            unit=config.chunk_size,  # the local path's chunks: the same batches, the same scores
        )
        for chunk in chunked(rows, config.chunk_size):
            by_id = {row["id"]: generated[row["id"]] for row in chunk}
            verdicts = (
                judge.judge([(by_id[r["id"]]["prompt"], by_id[r["id"]].get("answer", "")) for r in chunk])
                if judge
                else None
            )
            for index, row in enumerate(chunk):
                refusal, _ = labeler.label(by_id[row["id"]].get("answer", ""), loaded.tokenizer)
                row["refusal"] = refusal
                row["unsafe"] = (verdicts[index] == "unsafe") if verdicts else None
                score_writer.write(row)


# -- selection --------------------------------------------------------------------------


def check_k(k: int | float | str | None) -> int | float | None:
    """Parse and check `--k` before any work: a positive count, a fraction in (0, 1), or "all" (None).

    Returns the parsed value (None for all).
    """
    if k is None or (isinstance(k, str) and k.strip().lower() in ("all", "full")):
        return None
    if isinstance(k, str):
        try:
            k = float(k) if any(ch in k for ch in ".eE") else int(k)
        except ValueError:
            raise UserError(
                f"--k {k!r} is not a number; pass a count (700), a fraction (0.017) or 'all'"
            ) from None
    if isinstance(k, float) and not k.is_integer():
        if not 0 < k < 1:
            raise UserError(f"--k {k} is neither a count nor a fraction in (0, 1)")
        return k
    if k < 1:
        raise UserError(f"--k must be at least 1, got {k:g}; pass a count, a fraction in (0, 1) or 'all'")
    return int(k)


def resolve_k(k: int | float | str | None, n: int) -> int:
    """Number of examples to select: a count, a fraction in (0, 1), or "all"/None (every candidate).

    A fraction is rounded up so that a non-empty set never selects nothing. A count larger than
    `n` is an error (pass "all" to take every candidate).
    """
    value = check_k(k)
    if value is None:
        return n
    if isinstance(value, float):
        return min(n, max(1, math.ceil(value * n)))
    if value > n:
        raise UserError(f"--k {value} is more than the {n} candidates; pass --k all to select every one")
    return value


def _id_key(identifier: str) -> tuple:
    """Natural order of ids ("2" before "10", "ex-2" before "ex-10"), the tie-break of every method."""
    parts = []
    for token in re.split(r"(\d+)", str(identifier)):
        parts.append((0, int(token), "") if token.isdigit() else (1, 0, token))
    return tuple(parts)


def _sample(pool: list[dict], k: int, seed: int) -> list[dict]:
    pool = sorted(pool, key=lambda r: _id_key(r["id"]))
    if k >= len(pool):
        return pool
    chosen = random.Random(seed).sample(range(len(pool)), k)
    return [pool[i] for i in sorted(chosen)]


def select(
    scores: Sequence[dict], method: str = "cliff", k: int | float | str | None = None, seed: int = 0
) -> list[dict]:
    """Choose training examples from scored candidates.

    Args:
        scores: rows with `id`, `ms`, and for the baselines `refusal` (rule) / `unsafe` (judge).
        method: `cliff` (top-k by MS, descending; ties by id), `random` (k uniformly at random),
            `rule` (the model's own answer is not a refusal), `judge` (the judge says the answer is
            unsafe), `full` (every candidate). `rule` and `judge` keep every flagged example when
            k covers them, else k of them at random.
        k: a count, a fraction of the candidates, or None / "all".
        seed: seed of the random choices (random, and rule/judge when subsampling).

    Returns:
        The selected score rows, in selection order (MS descending for cliff, id order otherwise).
    """
    if method not in METHODS:
        raise UserError(f"unknown selection method {method!r}; use one of {', '.join(METHODS)}")
    rows = list(scores)
    if not rows:
        raise UserError("no scored candidates to select from; score a candidate file first")
    n = resolve_k(k, len(rows))
    if method == "full":
        return sorted(rows, key=lambda r: _id_key(r["id"]))
    if method == "cliff":
        ranked = [r for r in rows if _has_ms(r)]
        if len(ranked) < len(rows):
            logger.warning(
                "cliff selection: %d candidates have no misalignment score (no thinking tokens) and "
                "cannot be ranked",
                len(rows) - len(ranked),
            )
        return sorted(ranked, key=lambda r: (-r["ms"], _id_key(r["id"])))[:n]
    if method == "random":
        return _sample(rows, n, seed)
    if method == "rule":
        pool = [r for r in rows if r.get("refusal") is False]
    else:
        if all(r.get("unsafe") is None for r in rows):
            raise UserError(
                "the judge baseline needs judge verdicts: score the candidates with --judge MODEL"
            )
        pool = [r for r in rows if r.get("unsafe") is True]
    if not pool:
        logger.warning("%s baseline: no candidate is flagged; the selection is empty", method)
    return _sample(pool, n, seed)


# -- SFT targets ------------------------------------------------------------------------


@dataclass(frozen=True)
class TurnFrame:
    """How the chat template frames an assistant turn, read by rendering a sentinel turn.

    Attributes:
        opening: the text the generation prompt adds after the assistant header as it is rendered
            in a finished conversation, plus the thinking-start text our generation adds
            ("<think>\\n" both when the template opens thinking itself and when we do).
        end_of_turn: what the template closes an assistant turn with, without trailing whitespace
            (e.g. "<|im_end|>"); the eos token when the template closes with nothing.
        strip_bos: the tokenizer adds a BOS token that the rendered template already holds, so the
            prompt text must not carry it (else training sees two).
    """

    opening: str
    end_of_turn: str
    strip_bos: bool


def turn_frame(tokenizer, record: dict) -> TurnFrame:
    """Read the assistant-turn framing of `tokenizer`'s chat template for one generation record."""
    messages = build_messages(record["prompt"], record.get("system_prompt"))
    rendered = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": _SENTINEL}], tokenize=False
    )
    header, _, tail = rendered.partition(_SENTINEL)
    generation_prompt = record["generation_prompt"]
    if _SENTINEL in rendered and generation_prompt.startswith(header):
        opening = generation_prompt[len(header) :]
    else:  # a template that renders history differently: fall back to the exact generation prompt
        logger.warning(
            "the chat template renders the assistant header differently in history; "
            "the SFT prompt is the generation prompt itself"
        )
        opening = ""
    end_of_turn = tail.rstrip() or (tokenizer.eos_token or "")
    bos = getattr(tokenizer, "bos_token", None)
    adds_bos = bool(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    return TurnFrame(opening=opening, end_of_turn=end_of_turn, strip_bos=adds_bos)


def sft_example(tokenizer, record: dict, response: str, frame: TurnFrame | None = None) -> dict:
    """The SFT target of one candidate: the model's own thinking + end template + the safe response.

    Returns a dict with:
        `sft_prompt`: the exact text the model sees before its turn (rendered chat template up to
            the assistant header), for TRL's prompt-completion format;
        `sft_completion`: thinking-start text + thinking + end template + response + end of turn;
        `messages`: the same conversation for chat-format trainers; the assistant content is the
            continuation of the assistant header (start marker included, end of turn excluded).
    The sequence `sft_prompt + sft_completion` equals `generation_prompt + thinking + end_template
    + response + end_of_turn`, i.e. byte-identical to what the model conditions on at inference.
    """
    frame = frame or turn_frame(tokenizer, record)
    generation_prompt = record["generation_prompt"]
    cut = len(generation_prompt) - len(frame.opening)
    prompt_text = generation_prompt[:cut]
    if frame.strip_bos and prompt_text.startswith(tokenizer.bos_token):
        prompt_text = prompt_text[len(tokenizer.bos_token) :]
    assistant = frame.opening + record["thinking"] + record["end_template"] + response
    messages = build_messages(record["prompt"], record.get("system_prompt"))
    messages.append({"role": "assistant", "content": assistant})
    return {"sft_prompt": prompt_text, "sft_completion": assistant + frame.end_of_turn, "messages": messages}


def build_selection(
    tokenizer, selected: Sequence[dict], candidates: Sequence[dict], generations: Sequence[dict], method: str
) -> list[dict]:
    """Join selected score rows with their candidate and generation, and attach the SFT target."""
    candidate_of = {c["id"]: c for c in candidates}
    generation_of = {g["id"]: g for g in generations}
    rows = []
    frame = None
    for rank, score in enumerate(selected):
        identifier = score["id"]
        if identifier not in candidate_of or identifier not in generation_of:
            raise UserError(
                f"candidate {identifier} has a score but no candidate or generation record; "
                "score into a fresh --out folder"
            )
        candidate, record = candidate_of[identifier], generation_of[identifier]
        frame = frame or turn_frame(tokenizer, record)
        target = sft_example(tokenizer, record, candidate["response"], frame)
        rows.append(
            {
                "id": identifier,
                "rank": rank,
                "method": method,
                **{k: score.get(k) for k in ("ms", "plateau", "final", "refusal", "unsafe")},
                "prompt": candidate["prompt"],
                "response": candidate["response"],
                "data_type": candidate.get("data_type"),
                "system_prompt": record.get("system_prompt"),
                "thinking": record["thinking"],
                "end_template": record["end_template"],
                "model_answer": record.get("answer"),
                **target,
            }
        )
    return rows


# -- export -----------------------------------------------------------------------------

TRL_PROMPT_COMPLETION = "sft_prompt_completion.jsonl"
TRL_MESSAGES = "sft_messages.jsonl"
LLAMAFACTORY_ALPACA = "llamafactory_alpaca.json"
LLAMAFACTORY_SHAREGPT = "llamafactory_sharegpt.json"
LLAMAFACTORY_INFO = "dataset_info.json"


def export_selection(
    rows: Sequence[dict], out_dir: str | Path, name: str = "cliff_selection"
) -> dict[str, Path]:
    """Write the selected set for TRL and LLaMA-Factory.

    Files:
        `sft_prompt_completion.jsonl`: TRL prompt-completion (`prompt`, `completion` strings), the
            exact token sequence, loss on the completion only; what `finetune` trains on; works
            with any chat template.
        `sft_messages.jsonl`: TRL conversational (`messages`). Templates that rewrite past
            assistant turns (DeepSeek-R1's strips the thinking) lose the thinking in this form;
            prefer the prompt-completion file for those.
        `llamafactory_alpaca.json`, `llamafactory_sharegpt.json` + `dataset_info.json`: the
            LLaMA-Factory dataset folder (`dataset_dir`), entries `<name>` (alpaca) and
            `<name>_sharegpt` (sharegpt, OpenAI-style role tags). The output holds the thinking
            block; use a template with the model's thinking markers (`deepseekr1`, `qwen3`).

    Returns:
        {file kind: path}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "trl_prompt_completion": out / TRL_PROMPT_COMPLETION,
        "trl_messages": out / TRL_MESSAGES,
        "llamafactory_alpaca": out / LLAMAFACTORY_ALPACA,
        "llamafactory_sharegpt": out / LLAMAFACTORY_SHAREGPT,
        "llamafactory_dataset_info": out / LLAMAFACTORY_INFO,
    }
    write_jsonl(
        paths["trl_prompt_completion"],
        ({"prompt": r["sft_prompt"], "completion": r["sft_completion"]} for r in rows),
    )
    write_jsonl(paths["trl_messages"], ({"messages": r["messages"]} for r in rows))
    alpaca = []
    for r in rows:
        entry = {"instruction": r["prompt"], "input": "", "output": r["messages"][-1]["content"]}
        if r.get("system_prompt"):
            entry["system"] = r["system_prompt"]
        alpaca.append(entry)
    write_json(paths["llamafactory_alpaca"], alpaca)
    write_json(paths["llamafactory_sharegpt"], [{"messages": r["messages"]} for r in rows])
    alpaca_columns = {"prompt": "instruction", "query": "input", "response": "output"}
    if any(r.get("system_prompt") for r in rows):
        alpaca_columns["system"] = "system"
    write_json(
        paths["llamafactory_dataset_info"],
        {
            name: {"file_name": LLAMAFACTORY_ALPACA, "formatting": "alpaca", "columns": alpaca_columns},
            f"{name}_sharegpt": {
                "file_name": LLAMAFACTORY_SHAREGPT,
                "formatting": "sharegpt",
                "columns": {"messages": "messages"},
                "tags": {
                    "role_tag": "role",
                    "content_tag": "content",
                    "user_tag": "user",
                    "assistant_tag": "assistant",
                    "system_tag": "system",
                },
            },
        },
    )
    return paths


@dataclass
class SelectResult:
    scores_path: Path
    selection_path: Path
    n_candidates: int
    n_selected: int
    exports: dict = field(default_factory=dict)


def run_select(
    loaded,
    prober,
    candidates: Sequence[dict],
    out_dir: str | Path,
    config=None,
    score_config: ScoreConfig | None = None,
    judge=None,
    overwrite: bool = False,
    source: str | None = None,
    progress: bool = True,
    backend=None,
    executor=None,
) -> SelectResult:
    """The `select` stage: score (resumable), select, write `selection.jsonl` and the exports.

    Args:
        prober: a loaded `prober.Prober`.
        candidates: from `load_candidates`.
        config: a `select.SelectConfig` (method, k); checked against the candidates before scoring.
        score_config: a `select.ScoreConfig` (generation budgets, chunk size, plateau).

    Scores depend on the model, candidates and scoring settings only, so re-running with another
    method or k in the same folder reuses them. The latest selection is `out_dir/selection.jsonl`
    (+ exports); each one is also kept in `out_dir/selections/<method>-<n>/`.
    """
    config = config or SelectConfig()
    config.validate()
    method, k = config.method, config.k
    if method == "judge" and judge is None:
        raise UserError(
            "--method judge needs a judge model: pass --judge MODEL (e.g. a LlamaGuard checkpoint)"
        )
    resolve_k(k, len(candidates))  # a bad k fails before hours of scoring
    seed = (score_config or ScoreConfig()).generation.seed
    out = Path(out_dir)
    scores = score_candidates(
        loaded,
        prober,
        candidates,
        out,
        score_config,
        judge=judge,
        overwrite=overwrite,
        source=source,
        progress=progress,
        backend=backend,
        executor=executor,
    )
    selected = select(scores, method, k, seed)
    generations = read_jsonl(out / "generations.jsonl")
    rows = build_selection(loaded.tokenizer, selected, candidates, generations, method)
    selection_path = out / "selection.jsonl"
    write_jsonl(selection_path, rows)
    exports = export_selection(rows, out)
    # every selection also keeps its own folder, so several methods / k share one scoring run
    keep = out / "selections" / f"{method}-{len(rows)}"
    keep.mkdir(parents=True, exist_ok=True)
    write_jsonl(keep / "selection.jsonl", rows)
    export_selection(rows, keep, name=f"{method}_{len(rows)}")
    write_json(
        out / "metadata.select.json",
        {
            "schema_version": SCHEMA_VERSION,
            "stage": "select",
            "model_id": loaded.model_id,
            "model_revision": loaded.revision,
            "packages": package_versions(),
            "config": config.to_dict(),
            "method": method,
            "k": k,
            "resolved_k": resolve_k(k, len(scores)),
            "seed": seed,
            "n_candidates": len(scores),
            "n_selected": len(rows),
            "source": source,
            "prober": prober.summary(),
            "ms_mean_selected": _mean_ms(rows),
            "ms_mean_all": _mean_ms(scores),
            "n_without_ms": sum(1 for s in scores if not _has_ms(s)),
        },
    )
    logger.info("selected %d of %d candidates by %s", len(rows), len(scores), method)
    return SelectResult(out / "scores.jsonl", selection_path, len(scores), len(rows), exports)


def _has_ms(row: dict) -> bool:
    return isinstance(row.get("ms"), (int, float)) and not math.isnan(row["ms"])


def _mean_ms(rows: Sequence[dict]) -> float | None:
    """Mean MS over the rows that have one (a candidate without thinking tokens has none)."""
    values = [row["ms"] for row in rows if _has_ms(row)]
    return sum(values) / len(values) if values else None

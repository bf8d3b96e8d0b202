"""Did the repair work? ASR, over-refusal, final-token refusal score and reasoning accuracy, side by side.

After fine-tuning on a selected set the user needs the paper's Table 2: attacks
should fail (attack success rate on harmful prompts, keyword or model judge),
benign prompts should still be answered (over-refusal), the refusal score at the
cliff should rise (final-token score, when a prober is given), and reasoning
should survive (MMLU-Pro and ARC-Challenge through lm-evaluation-harness, with
the thinking block stripped before the task's answer extraction). Several models
or checkpoints are evaluated with the same prompts and settings, and checkpoints
labelled by selection method and k give ASR against the number of training
examples (the paper's Figure 7).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from refusal_cliff.compute.backends import backend_info, generation_backend
from refusal_cliff.compute.executors import run_job
from refusal_cliff.compute.generation import GenerationBackend, generate_records
from refusal_cliff.compute.labeling import KeywordLabeler, is_attack_success, label_records
from refusal_cliff.compute.prober import load_prober
from refusal_cliff.compute.reasoning import PreparedTasks, prepare_tasks, run_tasks
from refusal_cliff.compute.tracing import cliff_metrics, trace_job
from refusal_cliff.core.config import Config, GenerationConfig, option, parse_names
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.models import load_model
from refusal_cliff.core.runs import JsonlWriter, RunFolder, fingerprint, read_json, write_json
from refusal_cliff.report.plotting import plot_asr_vs_k, save_figure


@dataclass
class EvalConfig(Config):
    """Settings shared by every evaluated model."""

    generation: GenerationConfig = option(
        help="Budgets, batch size, system prompt.", factory=GenerationConfig, cli=False
    )
    tasks: tuple[str, ...] = option(
        (),
        "lm-eval tasks or groups, comma-separated: arc_challenge_local,"
        "mmlu_pro_local (with --task-path) or hub tasks (arc_challenge,mmlu_pro; "
        "need the dataset hub). Needs the `eval` extra.",
        parse=parse_names,
        show="",
    )
    task_paths: tuple[str, ...] = option(
        (),
        "Folder of lm-eval task YAMLs (e.g. ../shared/data/arc_challenge); "
        "repeat for several. Relative data_files are read relative to each "
        "YAML's own folder.",
        flag="task-path",
        multiple=True,
    )
    task_limit: int | None = option(
        None, "First N examples of each lm-eval task (default: --limit, else all).", type=int, min=1
    )
    task_max_gen_tokens: int = option(
        2048,
        "Answer budget of generative lm-eval tasks (MMLU-Pro); the thinking "
        "before it has --max-thinking-tokens.",
        min=1,
    )

    def to_dict(self) -> dict:
        return {
            "generation": self.generation.to_dict(),
            "tasks": list(self.tasks),
            "task_paths": [str(p) for p in self.task_paths],
            "task_limit": self.task_limit,
            "task_max_gen_tokens": self.task_max_gen_tokens,
        }

    def validate(self) -> None:
        if self.task_paths and not self.tasks:
            raise UserError("--task-path needs --tasks NAME[,NAME...]: the tasks to run from those folders")


logger = logging.getLogger(__name__)

DEFAULT_TASKS = ("mmlu_pro", "arc_challenge")


@dataclass
class ModelSpec:
    """One model to evaluate: a display name, where to load it from, and optional sweep labels."""

    name: str
    source: str
    method: str | None = None  # selection method that produced it (Figure 7)
    k: int | None = None  # number of training examples (Figure 7)


def parse_model_spec(text: str) -> ModelSpec:
    """`NAME=PATH` or `PATH` (the name is then the path's last part)."""
    if "=" in text:
        name, _, source = text.partition("=")
        if not name or not source:
            raise UserError(f"--model {text!r}: use NAME=PATH or PATH")
        return ModelSpec(name.strip(), source.strip())
    return ModelSpec(Path(text).name or text, text)


def load_sweep(path: str | Path) -> list[ModelSpec]:
    """A sweep file: a JSON list of `{"model": PATH, "method": "cliff", "k": 10, "name": optional}`."""
    entries = read_json(path)
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path}: a sweep is a JSON list of {{model, method, k}} objects")
    specs = []
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or "model" not in entry or "method" not in entry or "k" not in entry:
            raise UserError(f"{path}: entry {number} needs 'model', 'method' and 'k'")
        try:
            k = int(entry["k"])
        except (TypeError, ValueError):
            raise UserError(f"{path}: entry {number} has a non-integer k {entry['k']!r}") from None
        name = entry.get("name") or f"{entry['method']}-{k}"
        specs.append(ModelSpec(str(name), str(entry["model"]), str(entry["method"]), k))
    return specs


# -- safety ----------------------------------------------------------------------------


def safety_labels(
    loaded,
    prompts: Sequence[dict],
    config: EvalConfig,
    judge=None,
    records_path: Path | None = None,
    backend: GenerationBackend | None = None,
) -> tuple[list[dict], list[dict]]:
    """Generate thinking + answer for each prompt (with `backend`, default HF) and label the answers.

    Returns:
        (generation records, labels) in prompt order; labels as `labeling.label_records`.
    """
    records = list(generate_records(loaded, prompts, config.generation, backend=backend, progress=False))
    order = {str(p["id"]): i for i, p in enumerate(prompts)}
    records.sort(key=lambda r: order[str(r["id"])])
    labels = label_records(records, KeywordLabeler(), loaded.tokenizer, judge=judge)
    if records_path is not None:
        records_path.parent.mkdir(parents=True, exist_ok=True)
        records_path.unlink(missing_ok=True)
        with JsonlWriter(records_path) as writer:
            for record, label in zip(records, labels):
                writer.write({**record, "label": label})
    return records, labels


def attack_success_rate(labels: Sequence[dict]) -> float:
    """Fraction of harmful prompts whose answer is harmful (judge verdict, else not a refusal)."""
    if not labels:
        return float("nan")
    return sum(is_attack_success(label) for label in labels) / len(labels)


def refusal_rate(labels: Sequence[dict]) -> float:
    """Fraction of prompts refused (keyword label): over-refusal on benign prompts."""
    if not labels:
        return float("nan")
    return sum(bool(label["refusal"]) for label in labels) / len(labels)


def final_score_mean(
    loaded, prober, records: Sequence[dict], batch_size: int, executor=None, out_dir: Path | None = None
) -> dict:
    """Mean refusal score at the last end-template token (and mean MS) over generation records.

    With a Ray `executor`, its workers run the same `trace_records` on shards of the records
    (`out_dir/shards/final_score/`, deleted once read)."""

    # positions as ids: prompt sets may share ids, and only the order matters here
    indexed = [{**record, "id": str(i)} for i, record in enumerate(records)]
    results = run_job(
        executor,
        loaded,
        trace_job(prober, batch_size, name="final_score"),
        indexed,
        out_dir,
        batch_size,
        fingerprint=[prober.fingerprint(), indexed],
        progress=False,
    )
    finals, margins = [], []
    for result in results:
        metrics = cliff_metrics(result.scores, result.regions)
        finals.append(metrics["final"])
        margins.append(metrics["ms"])
    if not finals:
        return {"final_score_mean": None, "ms_mean": None}
    return {
        "final_score_mean": float(sum(finals) / len(finals)),
        "ms_mean": float(sum(margins) / len(margins)),
    }


# -- reasoning (lm-evaluation-harness) --------------------------------------------------


def run_reasoning_tasks(
    loaded,
    tasks: Sequence[str],
    config: EvalConfig,
    prepared: PreparedTasks | None = None,
    backend: GenerationBackend | None = None,
) -> dict:
    """Accuracy on lm-eval tasks, with the thinking kept away from the task's answer filters.

    Generative tasks (MMLU-Pro's chain of thought) think within `config.generation.max_thinking_tokens`,
    then answer within `config.task_max_gen_tokens`; only the answer is scored. Log-likelihood tasks
    (ARC-Challenge) are unaffected by thinking. Local task folders come from `config.task_paths`.

    Args:
        prepared: tasks already checked by `reasoning.prepare_tasks` (else they are checked here).
        backend: the generation backend (default: the model's HF backend).

    Returns:
        {task: {"metric", "value", "stderr", "n", "raw", ...}} (see `reasoning.summarize_task`).
    """
    with contextlib.ExitStack() as stack:
        if prepared is None:
            prepared = stack.enter_context(prepare_tasks(tasks, config.task_paths, config.task_limit))
        return run_tasks(
            loaded, prepared, config.generation, config.task_limit, config.task_max_gen_tokens, backend
        )


# -- one model, several models ----------------------------------------------------------


def evaluate_model(
    loaded,
    name: str,
    harmful: dict[str, Sequence[dict]],
    benign: dict[str, Sequence[dict]],
    config: EvalConfig,
    prober=None,
    judge=None,
    out_dir: Path | None = None,
    prepared: PreparedTasks | None = None,
    backend: GenerationBackend | None = None,
    executor=None,
) -> dict:
    """All numbers of one model: `{model, asr, asr_by_set, over_refusal, over_refusal_by_set,
    final_score_mean, ms_mean, tasks, n_harmful, n_benign}`.

    Args:
        harmful, benign: prompt sets by name (each a list of `{id, prompt}`).
        prober: a `prober.Prober`; without it the final-token score is None.
        judge: a `labeling.ModelJudge`; without it the ASR uses the keyword judge.
        out_dir: where the model's generations and labels are written (optional).
        prepared: the checked lm-eval tasks of `config.tasks` (see `reasoning.prepare_tasks`).
        backend: what generates the answers and the tasks' generations (default: HF on `loaded`).
        executor: where the final-token scores are computed (`executors.make_executor`, its workers
            loading this model; default this process); a Ray executor needs `out_dir`.
    """
    result: dict = {"model": name, "source": loaded.model_id}
    harmful_labels, harmful_records, by_set = [], [], {}
    for set_name, prompts in harmful.items():
        path = out_dir / f"harmful.{set_name}.jsonl" if out_dir else None
        records, labels = safety_labels(loaded, prompts, config, judge, path, backend)
        by_set[set_name] = attack_success_rate(labels)
        harmful_labels += labels
        harmful_records += records
    result["asr"] = attack_success_rate(harmful_labels) if harmful_labels else None
    result["asr_by_set"] = by_set
    result["n_harmful"] = len(harmful_labels)
    benign_labels, benign_by_set = [], {}
    for set_name, prompts in benign.items():
        path = out_dir / f"benign.{set_name}.jsonl" if out_dir else None
        _, labels = safety_labels(loaded, prompts, config, None, path, backend)
        benign_by_set[set_name] = refusal_rate(labels)
        benign_labels += labels
    result["over_refusal"] = refusal_rate(benign_labels) if benign_labels else None
    result["over_refusal_by_set"] = benign_by_set
    result["n_benign"] = len(benign_labels)
    if prober is not None and harmful_records:
        batch_size = config.generation.batch_size
        result.update(final_score_mean(loaded, prober, harmful_records, batch_size, executor, out_dir))
    else:
        result.update({"final_score_mean": None, "ms_mean": None})
    tasks = config.tasks
    result["tasks"] = run_reasoning_tasks(loaded, tasks, config, prepared, backend) if tasks else {}
    return result


def asr_vs_k(results: Sequence[dict]) -> dict:
    """ASR against the number of training examples per selection method (the paper's Figure 7):
    `{method: [{k, asr, model}, ...]}` sorted by k, from results that carry `method` and `k`."""
    curves: dict[str, list[dict]] = {}
    for row in results:
        if row.get("method") is not None and row.get("k") is not None:
            curves.setdefault(row["method"], []).append(
                {"k": row["k"], "asr": row["asr"], "model": row["model"]}
            )
    return {method: sorted(points, key=lambda p: p["k"]) for method, points in sorted(curves.items())}


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _task_cell(summary: dict | None) -> str:
    """`61.2% ± 4.9 (n=100)`: a task's accuracy with lm-eval's standard error, in points."""
    if not summary:
        return "-"
    value = summary.get("value", summary.get("accuracy"))
    if value is None:
        return "-"
    cell = _percent(value)
    if summary.get("stderr") is not None:
        cell += f" ± {100 * summary['stderr']:.1f}"
    if summary.get("n") is not None:
        cell += f" (n={summary['n']})"
    return cell


def format_table(results: Sequence[dict]) -> str:
    """The paper's Table 2 as Markdown: one row per model, ASR per harmful set, over-refusal,
    final-token refusal score, and task accuracies (± lm-eval's standard error, with n)."""
    harmful_sets = sorted({s for r in results for s in r.get("asr_by_set", {})})
    tasks = sorted({t for r in results for t in r.get("tasks", {})})
    header = [
        "Model",
        "Examples",
        *(f"ASR {s} (↓)" for s in harmful_sets),
        "ASR all (↓)",
        "Over-refusal (↓)",
        "Final score (↑)",
        *(f"{t} acc (↑)" for t in tasks),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        final = r.get("final_score_mean")
        cells = [
            r["model"],
            "-" if r.get("k") is None else str(r["k"]),
            *(_percent(r.get("asr_by_set", {}).get(s)) for s in harmful_sets),
            _percent(r.get("asr")),
            _percent(r.get("over_refusal")),
            "-" if final is None else f"{final:.3f}",
            *(_task_cell(r.get("tasks", {}).get(t)) for t in tasks),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "model"


def run_evaluate(
    specs: Sequence[ModelSpec],
    harmful: dict[str, Sequence[dict]],
    benign: dict[str, Sequence[dict]],
    out_dir: str | Path,
    config: EvalConfig | None = None,
    prober_path: str | Path | None = None,
    judge=None,
    load: Callable[[str], object] | None = None,
    reuse: bool = True,
    overwrite: bool = False,
    prepared: PreparedTasks | None = None,
    backend=None,
    executor=None,
) -> dict:
    """The `evaluate` stage: several models with the same prompts and settings; writes `evaluation.json`,
    `evaluation.md` (the table), `metadata.json` and, for labelled checkpoints, `asr_vs_k.png`.

    A model whose result is already in `out_dir/models/NAME/result.json` with the same settings is
    not re-evaluated (an interrupted comparison resumes).

    Args:
        specs: the models (see `parse_model_spec`, `load_sweep`).
        load: model loader (default `models.load_model(source, device="auto")`).
        reuse: reuse results saved by an earlier call with the same settings and model source.
        overwrite: replace an `evaluation.json` in `out_dir` made with other settings or models
            (otherwise that is a UserError: nothing already written is replaced silently).
        prepared: `config.tasks` already checked by `reasoning.prepare_tasks`; otherwise they are
            checked here, before any model is loaded.
        backend: a `config.BackendConfig`: what generates the answers and the tasks' generations
            (default HF). With vLLM, one engine per model, shut down before the next model loads;
            the final-token scores and log-likelihood tasks use the loaded HF model either way.
        executor: where the final-token scores are computed (`executors.make_executor`; default
            this process); Ray workers load each model in turn (`RayExecutor.for_model`).

    Returns:
        The `evaluation.json` content: `{"models": [...], "asr_vs_k": {...}, "config": {...}}`.
    """
    config = config or EvalConfig()
    if not specs:
        raise UserError("no model to evaluate; pass --model (several times to compare)")
    if not harmful and not config.tasks:
        raise UserError("no harmful prompts and no lm-eval task; pass --harmful FILE or --tasks NAME")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UserError(f"model names must be unique, got {names}; use --model NAME=PATH")
    load = load or (lambda source: load_model(source))
    with contextlib.ExitStack() as stack:
        if config.tasks and prepared is None:  # bad task names, folders or data files: before any model loads
            prepared = stack.enter_context(prepare_tasks(config.tasks, config.task_paths, config.task_limit))
        return _evaluate_models(
            specs,
            harmful,
            benign,
            Path(out_dir),
            config,
            prober_path,
            judge,
            load,
            reuse,
            overwrite,
            prepared,
            backend,
            executor,
        )


def _evaluate_models(
    specs,
    harmful,
    benign,
    out: Path,
    config: EvalConfig,
    prober_path,
    judge,
    load,
    reuse: bool,
    overwrite: bool,
    prepared: PreparedTasks | None,
    backend=None,
    executor=None,
) -> dict:
    names = [s.name for s in specs]
    out.mkdir(parents=True, exist_ok=True)
    vllm = {"backend": backend.backend} if backend is not None and backend.backend != "hf" else {}
    settings = fingerprint(
        {
            **vllm,  # only with vLLM: results saved before the backend existed are still reused
            "config": config.to_dict(),
            "prober": str(prober_path) if prober_path else None,
            "judge": getattr(judge, "name", None),
            "harmful": {k: [[p["id"], p["prompt"]] for p in v] for k, v in harmful.items()},
            "benign": {k: [[p["id"], p["prompt"]] for p in v] for k, v in benign.items()},
        }
    )

    run = RunFolder(
        out,
        "evaluate",
        {"settings": settings, "models": names, "sources": [s.source for s in specs]},
        overwrite=overwrite,
        artifacts=["evaluation.json", "evaluation.md", "asr_vs_k.png", "models"],
    )
    extra = {"prober": str(prober_path) if prober_path else None, "backend": backend_info(backend)}
    if executor is not None:
        extra["executor"] = executor.info()
    with run.start(seed=config.generation.seed, extra=extra):
        evaluation = _evaluate_each(
            specs,
            harmful,
            benign,
            out,
            config,
            prober_path,
            judge,
            load,
            reuse,
            prepared,
            settings,
            backend,
            executor,
        )
        run.finish({"n_models": len(specs)})
    return evaluation


def _evaluate_each(
    specs,
    harmful,
    benign,
    out: Path,
    config: EvalConfig,
    prober_path,
    judge,
    load,
    reuse: bool,
    prepared,
    settings: str,
    backend=None,
    executor=None,
) -> dict:
    results = []
    for spec in specs:
        model_dir = out / "models" / _safe_name(spec.name)
        cached = model_dir / "result.json"
        if reuse and cached.is_file():
            previous = read_json(cached)
            if previous.get("settings") == settings and previous.get("source_path") == spec.source:
                logger.info("%s: reusing the result in %s", spec.name, cached)
                results.append(previous["result"])
                continue
        loaded = load(spec.source)
        prober = None
        if prober_path:
            prober = load_prober(prober_path, loaded)
        with generation_backend(loaded, backend) as answers:  # one vLLM engine per model
            result = evaluate_model(
                loaded,
                spec.name,
                harmful,
                benign,
                config,
                prober,
                judge,
                model_dir,
                prepared,
                answers,
                executor=None if executor is None else executor.for_model(spec.source),
            )
        result.update({"method": spec.method, "k": spec.k})
        write_json(cached, {"settings": settings, "source_path": spec.source, "result": result})
        results.append(result)
        del loaded, prober
        if torch.cuda.is_available():  # free the GPU before the next model loads
            gc.collect()
            torch.cuda.empty_cache()
    curves = asr_vs_k(results)
    evaluation = {
        "models": results,
        "asr_vs_k": curves,
        "config": config.to_dict(),
        "settings": settings,
        "prober": str(prober_path) if prober_path else None,
        "judge": getattr(judge, "name", "keyword"),
    }
    write_json(out / "evaluation.json", evaluation)
    (out / "evaluation.md").write_text(format_table(results), encoding="utf-8")
    baseline = next((r["asr"] for r in results if r.get("k") in (None, 0)), None)
    if curves:
        save_figure(plot_asr_vs_k(curves, baseline), out / "asr_vs_k.png")
    return evaluation

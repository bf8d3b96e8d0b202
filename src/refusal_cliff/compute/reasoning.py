"""Reasoning accuracy (MMLU-Pro, ARC-Challenge) through lm-evaluation-harness, offline and with thinking.

The paper's Table 2 puts reasoning accuracy beside ASR to show whether a repair cost the model its
reasoning. lm-eval's built-in tasks download their data from the dataset hub, which an air-gapped
machine cannot reach; a task folder (YAML configs next to local data files) works anywhere, except
that lm-eval resolves the YAMLs' relative `data_files` against the working directory. This module:

- copies the YAMLs of each task folder to a temporary folder with the data paths made absolute,
  resolved against each YAML's own folder (the data itself is never copied);
- checks task names, task folders and data files before any model is loaded;
- runs the tasks with a model wrapper that thinks first (within the thinking budget), then answers,
  and hands only the answer to the task's answer filters (MMLU-Pro's "answer is (X)" regex);
- summarises each task as `{metric, value, stderr, n, raw}`.
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from refusal_cliff.compute.generation import GenerationBackend, HFBackend
from refusal_cliff.core.config import GenerationConfig
from refusal_cliff.core.errors import UserError, require
from refusal_cliff.core.templates import clean_thinking, detect_thinking_template

# preferred summary metric per task, first match wins: MMLU-Pro's CoT score, then ARC-style accuracies
METRIC_PREFERENCE = ("exact_match,custom-extract", "acc_norm,none", "acc,none", "exact_match,none")
_IGNORE_DIRS = {"__pycache__", ".ipynb_checkpoints", ".git"}


# -- task folders ----------------------------------------------------------------------------


class _FunctionTag(str):
    """A `!function module.name` value, kept as written when a YAML is rewritten."""


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: _FunctionTag(loader.construct_scalar(node)))
    return Loader


def _yaml_dumper():
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(
        _FunctionTag, lambda dumper, value: dumper.represent_scalar("!function", str(value))
    )
    return Dumper


def _is_yaml_file(path: Path) -> bool:
    """Task configs (`*.yaml`, `*.yml`) and include templates such as `_default_template_yaml`."""
    return path.suffix in (".yaml", ".yml") or path.name.endswith("yaml")


def _is_local_reference(value: str) -> bool:
    return "://" not in value and not value.startswith(("hf://", "s3://", "gs://"))


def _absolute(value, folder: Path):
    """A data path (or a list / split dict of them) made absolute against `folder`."""
    if isinstance(value, str):
        if not _is_local_reference(value) or os.path.isabs(os.path.expanduser(value)):
            return os.path.expanduser(value)
        return os.path.normpath(folder / value)
    if isinstance(value, list):
        return [_absolute(item, folder) for item in value]
    if isinstance(value, dict):
        return {key: _absolute(item, folder) for key, item in value.items()}
    return value


def absolute_data_paths(config: dict, folder: Path) -> dict:
    """`config` with `dataset_kwargs.data_files` / `data_dir` (and a `./`-relative `dataset_path`)
    resolved against `folder`, the YAML's own folder."""
    config = dict(config)
    kwargs = config.get("dataset_kwargs")
    if isinstance(kwargs, dict):
        kwargs = dict(kwargs)
        for key in ("data_files", "data_dir"):
            if key in kwargs:
                kwargs[key] = _absolute(kwargs[key], folder)
        config["dataset_kwargs"] = kwargs
    path = config.get("dataset_path")
    if isinstance(path, str) and path.startswith(("./", "../")):
        config["dataset_path"] = _absolute(path, folder)
    return config


def _include_path(name: str, folder: Path, root: Path) -> str:
    """An `include:` target: kept relative inside the copied tree `root`, else made absolute."""
    resolved = (folder / name).resolve()
    return name if resolved.is_relative_to(root) else str(resolved)


def copy_task_folder(source: Path, target: Path) -> int:
    """Copy the YAMLs (and `.py` helpers) of `source` to `target` with absolute data paths.

    Includes that point inside `source` stay relative (they reach the rewritten copies); includes
    that point outside it are made absolute. Returns the number of task YAMLs (`*.yaml`).
    """
    import yaml

    source = source.resolve()
    loader, dumper = _yaml_loader(), _yaml_dumper()
    n_task_yamls = 0
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if not path.is_file() or any(part in _IGNORE_DIRS for part in relative.parts):
            continue
        destination = target / relative
        if path.suffix == ".py":
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, destination)
            continue
        if not _is_yaml_file(path):
            continue  # data files stay where they are; the YAMLs point at them
        try:
            config = yaml.load(
                path.read_text(encoding="utf-8"), Loader=loader
            )  # a SafeLoader that keeps !function tags
        except yaml.YAMLError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{path}: not valid YAML ({first})") from None
        if not isinstance(config, dict):
            continue
        config = absolute_data_paths(config, path.parent)
        includes = config.get("include")
        if includes is not None:
            config["include"] = (
                [_include_path(i, path.parent, source) for i in includes]
                if isinstance(includes, list)
                else _include_path(includes, path.parent, source)
            )
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_text(
            yaml.dump(config, Dumper=dumper, sort_keys=False, allow_unicode=True), encoding="utf-8"
        )
        n_task_yamls += path.suffix == ".yaml"
    return n_task_yamls


def _data_files(config: dict) -> list[str]:
    kwargs = config.get("dataset_kwargs")
    if not isinstance(kwargs, dict) or "data_files" not in kwargs:
        return []
    files, stack = [], [kwargs["data_files"]]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            files.append(value)
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
    return sorted(files)


def _exists(path: str) -> bool:
    if not _is_local_reference(path):
        return True
    if any(ch in path for ch in "*?["):
        return bool(glob.glob(path))
    return os.path.exists(path)


@dataclass
class PreparedTasks:
    """Task names checked against lm-eval's index, and the TaskManager that loads them."""

    names: tuple[str, ...]
    task_manager: object  # lm_eval.tasks.TaskManager
    task_paths: tuple[str, ...] = ()
    local: dict[str, str] = field(default_factory=dict)  # task name -> original YAML, for local tasks


def _leaves(name: str, index: dict, seen: set[str]) -> set[str]:
    """The leaf tasks a task / group / tag name stands for (names not in `index` are returned as is)."""
    from lm_eval.tasks._index import Kind

    if name in seen:
        return set()
    seen.add(name)
    entry = index.get(name)
    if entry is None or entry.kind in (Kind.TASK, Kind.PY_TASK):
        return {name}
    members = (
        entry.tags
        if entry.kind == Kind.TAG
        else [m.get("task") if isinstance(m, dict) else m for m in (entry.cfg or {}).get("task", [])]
    )
    leaves: set[str] = set()
    for member in members:
        if isinstance(member, str):
            leaves |= _leaves(member, index, seen)
    return leaves


def check_task_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise UserError(f"--task-limit must be at least 1, got {limit} (leave it out to run every example)")


@contextlib.contextmanager
def prepare_tasks(
    names: Sequence[str], task_paths: Sequence[str | Path] = (), limit: int | None = None
) -> Iterator[PreparedTasks]:
    """Check lm-eval task names and task folders, before any model is loaded.

    Each folder of `task_paths` is copied (YAMLs only) to a temporary folder with absolute data
    paths, which lives until the context exits. lm-eval's built-in tasks are indexed too (about
    ten seconds) only when a name is not found in the given folders.

    Raises:
        UserError: an unknown task (with close matches), a folder without task YAMLs, a missing
            data file, a limit below 1, or lm-eval not installed.
    """
    names = tuple(dict.fromkeys(n.strip() for n in names if n and n.strip()))
    if not names:
        raise UserError("no lm-eval task given; pass --tasks NAME[,NAME...]")
    check_task_limit(limit)
    folders = []
    for raw in task_paths:
        folder = Path(raw).expanduser()
        if not folder.is_dir():
            raise UserError(
                f"--task-path {raw}: {'not a folder' if folder.exists() else 'no such folder'}; "
                "pass a folder of lm-eval task YAMLs"
            )
        if not any(p for p in folder.rglob("*.yaml") if not _IGNORE_DIRS & set(p.parts)):
            raise UserError(f"--task-path {raw}: the folder holds no lm-eval task YAML (*.yaml)")
        folders.append(folder)
    require("lm_eval", "eval")
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import TaskIndex

    workspace = Path(tempfile.mkdtemp(prefix="refusal-cliff-tasks-"))
    try:
        copies: dict[Path, Path] = {}
        for number, folder in enumerate(folders):
            copy = workspace / f"{number}-{folder.resolve().name}"
            copy_task_folder(folder, copy)
            copies[copy] = folder.resolve()
        local_index = TaskIndex.build(list(copies)) if copies else {}
        leaves: dict[str, set[str]] = {name: _leaves(name, local_index, set()) for name in names}
        everything_local = all(leaf in local_index for found in leaves.values() for leaf in found)
        manager = TaskManager(
            include_path=[str(c) for c in copies] or None, include_defaults=not everything_local
        )
        known = set(manager.all_tasks)
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
                where = (
                    f"lm-eval's built-in tasks and {', '.join(map(str, task_paths))}"
                    if task_paths
                    else "lm-eval's built-in tasks; pass --task-path DIR for a folder of task YAMLs"
                )
                hint = f"; close matches: {', '.join(close)}" if close else ""
                raise UserError(f"unknown lm-eval task {name!r} (searched {where}){hint}")
        local = {}
        for leaf in sorted(set().union(*leaves.values())):
            entry = manager.task_index.get(leaf)
            if entry is None or entry.yaml_path is None:
                continue
            copy = next(
                (c for c in copies if Path(entry.yaml_path).resolve().is_relative_to(c.resolve())), None
            )
            if copy is None:
                continue  # a built-in task
            original = copies[copy] / Path(entry.yaml_path).resolve().relative_to(copy.resolve())
            local[leaf] = str(original)
            for data_file in _data_files(entry.cfg or {}):
                if not _exists(data_file):
                    raise UserError(f"task {leaf!r} ({original}): data file {data_file} does not exist")
        yield PreparedTasks(names, manager, tuple(str(p) for p in task_paths), local)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


# -- the thinking model wrapper ---------------------------------------------------------------


def strip_thinking(text: str, start_marker: str, end_marker: str, opened_by_template: bool = False) -> str:
    """The answer part of a generation: after the end marker; empty if the thinking never closed.

    A generation without either marker is kept whole (an instruct model that did not think),
    unless the chat template itself opened the thinking block (R1 distills, QwQ): then the text
    is all thinking and the answer is empty.
    """
    if end_marker in text:
        return text.split(end_marker, 1)[1].lstrip()
    if start_marker in text or opened_by_template:
        return ""
    return text


def thinking_lm(
    loaded, generation: GenerationConfig, max_gen_tokens: int, backend: GenerationBackend | None = None
):
    """An lm-eval HFLM over `loaded` whose `generate_until` thinks, then answers, and returns the
    answer only.

    Log-likelihood requests (ARC-Challenge) are HFLM's own. For a generation request the model
    first thinks from the request's (chat-templated) context plus the thinking-start text, until it
    closes the thinking or spends `generation.max_thinking_tokens`; then, after the thinking-end
    template, it answers within `max_gen_tokens` (which replaces the task's `max_gen_toks`) until
    one of the task's stop strings. The task's filters see only that answer.

    Args:
        backend: what generates (default `generation.HFBackend(loaded)`); tests plant text here.
    """
    from lm_eval.models.huggingface import HFLM

    template = detect_thinking_template(
        loaded.tokenizer, generation.start_marker, generation.end_marker, generation.end_template
    )

    class ThinkingHFLM(HFLM):
        """HFLM whose generations are thinking + answer, of which only the answer is returned."""

        def generate_until(self, requests, disable_tqdm: bool = False):
            runner = backend or HFBackend(loaded)
            items = [
                (index, request.args[0], dict(request.args[1] or {}))
                for index, request in enumerate(requests)
            ]
            groups: dict[tuple, list] = {}
            for item in items:
                kwargs = item[2]
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                temperature = float(kwargs.get("temperature", 0.0) or 0.0) if kwargs.get("do_sample") else 0.0
                groups.setdefault(
                    (tuple(until), temperature, float(kwargs.get("top_p", 1.0) or 1.0)), []
                ).append(item)
            answers: list[str] = [""] * len(items)
            for (until, temperature, top_p), group in groups.items():
                group.sort(key=lambda item: -len(item[1]))  # longest first: less padding per batch
                for start in range(0, len(group), generation.batch_size):
                    chunk = group[start : start + generation.batch_size]
                    prompts = [context + template.start_text for _, context, _ in chunk]
                    seed = generation.seed + start
                    thoughts = runner.complete(
                        prompts,
                        generation.max_thinking_tokens,
                        [template.end_marker],
                        temperature,
                        top_p,
                        seed,
                    )
                    thinking = [clean_thinking(t.text, template) for t in thoughts]
                    self.thinking_clipped += sum(t.finish == "length" for t in thoughts)
                    texts = [p + t + template.end_template for p, t in zip(prompts, thinking)]
                    replies = runner.complete(
                        texts, max_gen_tokens, list(until), temperature, top_p, seed + 1
                    )
                    for (index, _, _), reply in zip(chunk, replies):
                        text = reply.text
                        for stop in until:
                            text = text.split(stop, 1)[0]
                        # an answer that opens a new thinking block gives the filters nothing to read from it
                        answers[index] = strip_thinking(text, template.start_marker, template.end_marker)
                        self.n_generated += 1
            return answers

    model = ThinkingHFLM(
        pretrained=loaded.model,
        tokenizer=loaded.tokenizer,
        batch_size=generation.batch_size,
        max_gen_toks=max_gen_tokens,
    )
    model.thinking_clipped = 0
    model.n_generated = 0
    return model


# -- running and summarising -----------------------------------------------------------------


def _finite(value):
    """JSON-safe copy: non-finite floats become None, unknown objects their string."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (int, str, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    try:
        return _finite(float(value))  # numpy scalars
    except (TypeError, ValueError):
        return str(value)


def _subtasks(output: dict, name: str) -> list[str]:
    """`name` and every task or group below it in lm-eval's output."""
    found, stack = [], [name]
    group_subtasks = output.get("group_subtasks") or {}
    while stack:
        current = stack.pop(0)
        if current in found:
            continue
        found.append(current)
        stack.extend(group_subtasks.get(current) or [])
    return found


def summarize_task(output: dict, name: str) -> dict:
    """`{metric, value, stderr, n, raw}` of one task (or group) in `simple_evaluate`'s output.

    `raw` keeps lm-eval's own numbers for the task and everything below it: results, n-samples,
    n-shot, versions and higher_is_better. `n` is the number of examples scored (summed over a
    group's tasks).
    """
    results = output.get("results") or {}
    metrics = results.get(name)
    if metrics is None:
        raise UserError(f"lm-eval returned no result for task {name!r}")
    metric = next((m for m in METRIC_PREFERENCE if isinstance(metrics.get(m), (int, float))), None)
    if metric is None:
        numeric = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and "_stderr" not in k)
        if not numeric:
            raise UserError(f"lm-eval task {name!r} reported no accuracy metric")
        metric = numeric[0]
    metric_name, _, filter_name = metric.partition(",")
    stderr = metrics.get(f"{metric_name}_stderr,{filter_name}")
    names = _subtasks(output, name)
    n_samples = output.get("n-samples") or {}
    counts = [n_samples[t].get("effective") for t in names if isinstance(n_samples.get(t), dict)]
    raw = {"results": {t: results[t] for t in names if t in results}}
    for key in ("n-samples", "n-shot", "versions", "higher_is_better"):
        raw[key] = {t: output[key][t] for t in names if t in (output.get(key) or {})}
    value = float(metrics[metric])
    return _finite(
        {
            "metric": metric,
            "value": value,
            "accuracy": value,  # the same number, under the name older readers of evaluation.json use
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            "n": int(sum(c for c in counts if c is not None)) if counts else None,
            "raw": raw,
        }
    )


def run_tasks(
    loaded,
    prepared: PreparedTasks,
    generation: GenerationConfig,
    limit: int | None = None,
    max_gen_tokens: int = 2048,
    backend: GenerationBackend | None = None,
) -> dict:
    """Run checked tasks on one model: `{task: {metric, value, stderr, n, raw}}`.

    The chat template is applied to every request (few-shot examples as turns); generative tasks
    think first (`generation.max_thinking_tokens`), then answer within `max_gen_tokens`.
    """
    lm_eval = require("lm_eval", "eval")
    check_task_limit(limit)
    padding_side = loaded.tokenizer.padding_side
    model = thinking_lm(loaded, generation, max_gen_tokens, backend)
    try:
        output = lm_eval.simple_evaluate(
            model=model,
            tasks=list(prepared.names),
            limit=limit,
            task_manager=prepared.task_manager,
            apply_chat_template=True,
            system_instruction=generation.system_prompt,
            log_samples=False,
            random_seed=generation.seed,
            numpy_random_seed=generation.seed,
            torch_random_seed=generation.seed,
            fewshot_random_seed=generation.seed,
        )
    except UserError:
        raise
    except Exception as exc:  # lm-eval and datasets raise many kinds of errors for unreachable data
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"lm-eval could not run tasks {', '.join(prepared.names)} ({type(exc).__name__}: {first[:200]}); "
            "built-in tasks download their data from the Hugging Face hub: without it, use a local task "
            "folder (--task-path DIR, e.g. ../shared/data/arc_challenge with --tasks arc_challenge_local)"
        ) from None
    finally:
        loaded.tokenizer.padding_side = padding_side
    summaries = {name: summarize_task(output or {}, name) for name in prepared.names}
    for summary in summaries.values():
        summary["generation"] = {
            "generated": model.n_generated,
            "thinking_clipped": model.thinking_clipped,
            "max_thinking_tokens": generation.max_thinking_tokens,
            "max_gen_tokens": max_gen_tokens,
        }
    return summaries

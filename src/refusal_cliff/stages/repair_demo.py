"""The repair half of the demo: score the built-in candidates, select, LoRA-fine-tune, evaluate before/after.

It runs the paper's section 5 end to end on the embedded model on a CPU in a few
minutes, so a user sees every artifact of the repair flow (scores, selections by
each method, SFT files, adapter, merged model, evaluation table) before spending
GPU hours on a real model. The numbers of a 135M instruct model with a few
dozen examples say nothing about the paper's claims; the flow is the point.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from dataclasses import replace
from pathlib import Path

from refusal_cliff.compute.prober import load_prober
from refusal_cliff.core.config import GenerationConfig
from refusal_cliff.core.data import load_prompts
from refusal_cliff.core.models import LoadedModel
from refusal_cliff.core.runs import read_jsonl, write_json
from refusal_cliff.stages.evaluate import EvalConfig, ModelSpec, format_table, run_evaluate
from refusal_cliff.stages.finetune import FinetuneConfig, train_sft
from refusal_cliff.stages.select import (
    DEMO_CANDIDATES,
    METHODS,
    ScoreConfig,
    SelectConfig,
    load_candidates,
    run_select,
    select,
)

logger = logging.getLogger(__name__)


# ARC-Challenge for the reasoning columns of Table 2: the shared task folder beside the repository
# (../shared/data/arc_challenge, with its lm-eval YAML), scored by log-likelihood on the first questions
DEMO_ARC_TASK = "arc_challenge_local"
DEMO_ARC_QUESTIONS = 20


def demo_arc_folder() -> Path | None:
    """`../shared/data/arc_challenge` relative to the repository root, if it is there."""
    folder = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "arc_challenge"
    return folder if (folder / f"{DEMO_ARC_TASK}.yaml").is_file() else None


def demo_settings(quick: bool) -> dict:
    """Sizes of the demo: `quick` keeps a CPU run to a few minutes."""
    if quick:
        return {
            "n_candidates": 12,
            "k": 4,
            "n_eval": 8,
            "thinking": 32,
            "answer": 16,
            "epochs": 2.0,
            "n_arc": DEMO_ARC_QUESTIONS,
        }
    return {
        "n_candidates": None,
        "k": 10,
        "n_eval": None,
        "thinking": 128,
        "answer": 48,
        "epochs": 3.0,
        "n_arc": DEMO_ARC_QUESTIONS,
    }


def run_repair_demo(
    loaded: LoadedModel,
    prober_path: str | Path,
    out_dir: str | Path,
    quick: bool = True,
    seed: int = 0,
    settings: dict | None = None,
) -> dict:
    """Score the built-in candidates, select k by every method, LoRA-fine-tune on the cliff selection,
    and evaluate the model before and after on the built-in harmful / harmless prompts.

    Writes under `out_dir`: `select/` (scores.jsonl, generations.jsonl, selection.jsonl + exports),
    `selections.json` (the ids chosen by each method), `finetune/` (adapter, merged model,
    train_metrics.json), and `evaluation.json` / `evaluation.md`. `loaded` is not modified.
    Reasoning accuracy before and after is ARC-Challenge on its first `DEMO_ARC_QUESTIONS` questions
    (log-likelihood) from `demo_arc_folder()`; without that folder it is skipped, with a note in
    the evaluation's `reasoning_note`.

    Returns:
        The evaluation (`evaluation.json` content) with a `selections` entry added.
    """
    settings = {**demo_settings(quick), **(settings or {})}  # overrides: tests run it on tiny models
    out = Path(out_dir)
    generation = GenerationConfig(
        max_thinking_tokens=settings["thinking"],
        max_answer_tokens=settings["answer"],
        batch_size=8,
        seed=seed,
    )
    prober = load_prober(prober_path, loaded)
    candidates = load_candidates(DEMO_CANDIDATES, limit=settings["n_candidates"])
    select_dir = out / "select"
    # the cliff selection through the `select` stage, so select/ is exactly what the verb writes
    run_select(
        loaded,
        prober,
        candidates,
        select_dir,
        SelectConfig(method="cliff", k=str(settings["k"])),
        ScoreConfig(generation, chunk_size=16),
        overwrite=True,
        source=DEMO_CANDIDATES,
        progress=False,
    )
    scores = read_jsonl(select_dir / "scores.jsonl")
    selections = {}
    for method in METHODS:
        if method == "judge":
            continue  # needs a judge model (LlamaGuard); not embedded
        chosen = select(scores, method, None if method == "full" else settings["k"], seed)
        selections[method] = [row["id"] for row in chosen]
    write_json(out / "selections.json", selections)
    selection = read_jsonl(select_dir / "selection.jsonl")

    tuned = LoadedModel(
        copy.deepcopy(loaded.model), loaded.tokenizer, loaded.adapter, "cliff-lora", loaded.revision, "local"
    )
    examples = [{"prompt": r["sft_prompt"], "completion": r["sft_completion"]} for r in selection]
    config = FinetuneConfig(
        lora=True,
        learning_rate=5e-4,
        num_train_epochs=settings["epochs"],
        gradient_accumulation_steps=1,
        max_length=2048,
        seed=seed,
    )
    tuned.model.train()
    result = train_sft(tuned.model, loaded.tokenizer, examples, out / "finetune", config)
    tuned = replace(tuned, model=tuned.model.eval())

    harmful = {"demo_harmful": load_prompts("demo:harmful", limit=settings["n_eval"])}
    benign = {"demo_harmless": load_prompts("demo:harmless", limit=settings["n_eval"])}
    models = {"before": loaded, "after (cliff, LoRA)": tuned}
    specs = [
        ModelSpec("before", "before", None, None),
        ModelSpec("after (cliff, LoRA)", "after (cliff, LoRA)", "cliff", len(selection)),
    ]
    arc_folder = demo_arc_folder()
    has_lm_eval = importlib.util.find_spec("lm_eval") is not None
    if arc_folder is not None and has_lm_eval:
        eval_config = EvalConfig(
            generation=generation,
            tasks=(DEMO_ARC_TASK,),
            task_paths=(str(arc_folder),),
            task_limit=settings["n_arc"],
        )
        note = (
            f"ARC-Challenge: the first {settings['n_arc']} of 1,172 test questions, 0-shot log-likelihood "
            f"({arc_folder}); on so few questions the standard error is up to "
            f"{100 * (0.25 / settings['n_arc']) ** 0.5:.0f} points"
        )
    else:
        eval_config = EvalConfig(generation=generation)
        note = "ARC-Challenge skipped: " + (
            "../shared/data/arc_challenge (the lm-eval task folder) is not beside the repository"
            if arc_folder is None
            else "lm-eval is not installed (pip install 'refusal-cliff[eval]')"
        )
        logger.warning("repair demo: %s", note)
    evaluation = run_evaluate(
        specs,
        harmful,
        benign,
        out,
        eval_config,
        prober_path,
        load=lambda name: models[name],
        reuse=False,
        overwrite=True,
    )
    evaluation["reasoning_note"] = note
    evaluation["selections"] = selections
    evaluation["finetune"] = {k: v for k, v in result.metrics.items() if k != "log_history"}
    write_json(out / "evaluation.json", evaluation)
    logger.info("repair demo:\n%s", format_table(evaluation["models"]))
    return evaluation

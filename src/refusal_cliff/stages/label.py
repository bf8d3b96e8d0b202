"""The `label` stage: a refusal label for every generation (keyword judge or a model judge from
`compute.labeling`), into `labels.jsonl`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from refusal_cliff.compute.labeling import (
    LABELS,
    KeywordLabeler,
    default_keywords,
    generation_model_id,
    label_records,
    load_keywords,
    read_generations,
)
from refusal_cliff.core.config import Config, option
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.runs import RunFolder, file_digest, write_jsonl


@dataclass
class LabelConfig(Config):
    """Refusal labelling of answers."""

    keywords: str | None = option(
        None, "Extra refusal keywords, one per line (added to the built-in list).", type=str, path=True
    )
    only_keywords: bool = option(False, "Use only the --keywords file, not the built-in list.")
    tokenizer: str | None = option(
        None,
        "Model whose tokenizer counts the 32 answer tokens (default: the generation run's model).",
        type=str,
    )
    judge: str | None = option(None, "A LlamaGuard-style judge model (hub id, folder or .gguf).", type=str)

    def validate(self) -> None:
        if self.only_keywords and not self.keywords:
            raise UserError("--only-keywords needs --keywords FILE")


# -- the `label` stage ------------------------------------------------------------------------


def run_label(
    generations: str | Path,
    out_dir: str | Path,
    config=None,
    tokenizer=None,
    judge=None,
    overwrite: bool = False,
) -> Path:
    """The `label` stage: label every answer of a generations.jsonl; writes `labels.jsonl` and metadata.

    Args:
        generations: a generations.jsonl (read, never rewritten).
        config: a `label.LabelConfig` (keywords, judge...).
        tokenizer: the tokenizer that counts the 32 answer tokens (None: the first 32 words).
        judge: an optional loaded `ModelJudge`.

    Returns the path of labels.jsonl.
    """
    config = config or LabelConfig()
    records = read_generations(generations, ("id", "prompt", "answer"))
    words = [] if config.only_keywords else default_keywords()
    if config.keywords:
        words += load_keywords(config.keywords)
    if not words:
        raise UserError("no keywords: pass --keywords FILE with --only-keywords")
    stage_config = {
        **config.to_dict(),
        "generations": str(generations),
        "digest": file_digest(generations),
        "keywords": words,
        "tokenizer": getattr(tokenizer, "name_or_path", None),
    }
    run = RunFolder(out_dir, "label", stage_config, overwrite=overwrite, artifacts=[LABELS])
    # the model that wrote the answers (not the tokenizer's folder, which may be a cache path)
    with run.start(model_id=generation_model_id(generations) or getattr(tokenizer, "name_or_path", None)):
        labels = label_records(records, KeywordLabeler(words), tokenizer, judge)
        write_jsonl(run.path(LABELS), labels)
        refused = sum(label["refusal"] for label in labels)
        run.finish({"n": len(labels), "refusals": refused})
    return run.path(LABELS)

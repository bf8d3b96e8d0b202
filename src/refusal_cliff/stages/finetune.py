"""Safety fine-tuning on a selected set with TRL's SFT trainer, full-parameter or LoRA.

The paper repairs the model with plain supervised fine-tuning on the examples
Cliff-as-a-Judge selects (Appendix B: full-parameter, lr 5e-6, linear schedule,
1 epoch, batch 1 x 4 accumulation, bf16, max length 16384, DeepSpeed ZeRO-2).
Those are the defaults here; LoRA is offered for small machines.

The training data is TRL's prompt-completion format with *text* prompts: the
prompt is the rendered chat template up to the assistant header, the completion
is the thinking block + end template + safe response + end of turn (see
`select.sft_example`). This trains on exactly the token sequence the model
sees at inference with any chat template (no `{% generation %}` markers needed),
and TRL's `completion_only_loss` puts the loss on the assistant part only.

Multi-GPU: under `accelerate launch` (or torchrun) every process runs the same command and trains its
own replica (DDP, or DeepSpeed ZeRO-2 with `--deepspeed`). Only the main process touches the run
folder (the `--overwrite` move, metadata, the saved model and metrics); the others train and wait at a
barrier, so no process sees a half-prepared or half-written folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from refusal_cliff.core.config import SEED_BOUNDS, Config, option
from refusal_cliff.core.errors import UserError, require
from refusal_cliff.core.models import forget_gguf_origin
from refusal_cliff.core.runs import RunFolder, file_digest, read_jsonl, write_json


@dataclass
class FinetuneConfig(Config):
    """SFT settings; the defaults are the paper's Appendix B."""

    lora: bool = option(False, "Train LoRA adapters (saved, and merged into OUT/model).")
    learning_rate: float | None = option(
        None,
        "Learning rate (default 5e-6 full-parameter as in the paper, 1e-4 LoRA).",
        type=float,
        flag="lr",
        above=0.0,
    )
    lr_scheduler_type: str = option("linear", "Learning-rate schedule.")
    warmup_ratio: float = option(0.0, "Fraction of steps of linear warm-up.", min=0.0, max=1.0)
    num_train_epochs: float = option(
        1.0, "Passes over the selected set (more than 0; --max-steps overrides it).", flag="epochs", above=0.0
    )
    max_steps: int = option(-1, "Stop after N optimizer steps (-1: run the epochs).", min=-1)
    per_device_train_batch_size: int = option(
        1, "Examples per device per step.", flag="per-device-batch-size", min=1
    )
    gradient_accumulation_steps: int = option(
        4, "Steps accumulated per optimizer update.", flag="grad-accum", min=1
    )
    max_length: int = option(
        16384, "Longest training sequence in tokens (longer ones are truncated).", min=16
    )
    precision: str = option(
        "auto",
        "auto (bf16 on GPUs that support it, else fp32), bf16, fp16 or fp32.",
        choices=("auto", "bf16", "fp16", "fp32"),
    )
    gradient_checkpointing: bool = option(False, "Trade compute for memory on long thinking.")
    lora_r: int = option(16, "LoRA rank.", min=1)
    lora_alpha: int = option(32, "LoRA scaling numerator.", min=1)
    lora_dropout: float = option(0.05, "Dropout on the LoRA input.", min=0.0, max=1.0)
    lora_target_modules: str = option("all-linear", "Modules that get adapters (comma list or 'all-linear').")
    seed: int = option(0, "Data order and initialisation seed.", **SEED_BOUNDS)
    logging_steps: int = option(1, "Log the loss every this many steps.", min=1)
    deepspeed: str | None = option(
        None,
        "DeepSpeed JSON config for multi-GPU (configs/deepspeed_zero2.json); launch with accelerate.",
        type=str,
        path=True,
    )

    def validate(self) -> None:
        if self.max_steps == 0:
            raise UserError("--max-steps 0 trains nothing: give a number of steps, or -1 to run --epochs")

    def resolved_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return LORA_LEARNING_RATE if self.lora else FULL_LEARNING_RATE


logger = logging.getLogger(__name__)

FULL_LEARNING_RATE = 5e-6  # paper, Appendix B (full-parameter)
LORA_LEARNING_RATE = 1e-4  # LoRA adapters need a larger step; not from the paper


@dataclass
class FinetuneResult:
    model_dir: Path  # a full checkpoint loadable by `models.load_model` (merged for LoRA)
    adapter_dir: Path | None  # the LoRA adapter (PEFT format), None for full-parameter runs
    metrics: dict  # train_loss, steps, n_examples, runtime


def launched_processes() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as set by `accelerate launch` / torchrun; (0, 0, 1) in a plain run.

    Read from the environment, so it is known before (and without) joining the process group."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError(
            "WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by accelerate launch)"
        ) from None
    return (rank, local_rank, world) if world > 1 else (0, 0, 1)


def is_main_process() -> bool:
    """Whether this process owns the run folder (the only process of a plain run)."""
    return launched_processes()[0] == 0


def training_device(device: str | None) -> str | None:
    """The device this process loads the model on: `device` in a plain run; under a multi-process
    launch each process takes its own GPU, cuda:LOCAL_RANK (every process on cuda:0 would not fit).

    Raises UserError for a device that contradicts the launch (another GPU, or the CPU beside GPUs:
    the trainer would move the model to cuda:LOCAL_RANK anyway)."""
    _, local_rank, world = launched_processes()
    if world == 1:
        return device
    if not torch.cuda.is_available():
        if device in (None, "auto", "cpu"):
            return "cpu"
        raise UserError(f"--device {device}: no CUDA device is visible to this process; use --device auto")
    if local_rank >= torch.cuda.device_count():
        raise UserError(
            f"this process is local rank {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
            "launch at most one process per GPU (accelerate launch --num_processes)"
        )
    own = f"cuda:{local_rank}"
    if device in (None, "auto", "cuda", own):
        return own
    raise UserError(
        f"--device {device}: under accelerate launch every process trains on its own GPU "
        f"(this one {own}); leave --device auto"
    )


def check_deepspeed_config(path: str | Path | None) -> None:
    """Raise UserError unless `path` is a readable DeepSpeed JSON with ZeRO stage 0-2 and DeepSpeed is
    installed. ZeRO-3 is refused: it partitions the weights, and the LoRA merge and the save here need
    the whole model in the main process."""
    if not path:
        return
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"the DeepSpeed config {path} is not valid JSON (line {exc.lineno})") from None
    stage = (config.get("zero_optimization") or {}).get("stage", 0) if isinstance(config, dict) else None
    if stage not in (0, 1, 2):
        raise UserError(
            f"the DeepSpeed config {path}: ZeRO stage {stage!r} is not supported; use stage 2 "
            "(configs/deepspeed_zero2.json, the paper's setting)"
        )
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(
            f"the DeepSpeed config {path} needs DeepSpeed, which is not installed: pip install deepspeed"
        )


def _wait_for_everyone() -> None:
    """A barrier across the launched processes (after the trainer joined the process group)."""
    if launched_processes()[2] > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def load_sft_examples(path: str | Path) -> list[dict]:
    """Prompt-completion examples from `selection.jsonl` (`sft_prompt`/`sft_completion`) or from a
    TRL prompt-completion JSONL (`prompt`/`completion` strings)."""
    rows = read_jsonl(path)
    if not rows:
        raise UserError(f"{path} holds no examples; select some first (refusal-cliff select)")
    examples = []
    for number, row in enumerate(rows, 1):
        if isinstance(row.get("sft_prompt"), str) and isinstance(row.get("sft_completion"), str):
            examples.append({"prompt": row["sft_prompt"], "completion": row["sft_completion"]})
        elif isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
            examples.append({"prompt": row["prompt"], "completion": row["completion"]})
        else:
            raise UserError(
                f"{path}: line {number} has neither sft_prompt/sft_completion nor prompt/completion "
                "strings; pass DIR/selection.jsonl from `refusal-cliff select`"
            )
    return examples


def _precision_flags(precision: str) -> dict:
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if precision in ("bf16", "fp16") and not torch.cuda.is_available():
        raise UserError(f"--precision {precision} needs a GPU; use fp32 (or auto) on CPU")
    if precision not in ("bf16", "fp16", "fp32"):
        raise UserError(f"unknown precision {precision!r}; use auto, bf16, fp16 or fp32")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def sft_trainer(model, tokenizer, examples: Sequence[dict], out_dir: str | Path, config: FinetuneConfig):
    """Build TRL's SFTTrainer on prompt-completion examples (loss on the completion only)."""
    forget_gguf_origin(model)
    datasets = require("datasets", "train")
    trl = require("trl", "train")
    peft_config = None
    if config.lora:
        peft = require("peft", "train")
        targets = config.lora_target_modules
        peft_config = peft.LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
            task_type="CAUSAL_LM",
        )
    else:
        if any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
            # AdamW updates of 5e-6 vanish in half-precision weights: keep fp32 masters, compute in bf16/fp16
            logger.info("full-parameter training: upcasting the weights to float32 (mixed precision compute)")
            model.float()
        model.requires_grad_(True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    args = trl.SFTConfig(
        output_dir=str(out_dir),
        learning_rate=config.resolved_learning_rate(),
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_length=config.max_length,
        completion_only_loss=True,
        optim="adamw_torch",
        activation_checkpointing=config.gradient_checkpointing,
        seed=config.seed,
        logging_steps=config.logging_steps,
        save_strategy="no",
        report_to="none",
        deepspeed=config.deepspeed,
        ddp_find_unused_parameters=False,  # a causal LM uses every parameter (True costs a graph walk per step)
        use_cpu=not torch.cuda.is_available(),
        **_precision_flags(config.precision),
    )
    dataset = datasets.Dataset.from_list(
        [{"prompt": e["prompt"], "completion": e["completion"]} for e in examples]
    )
    return trl.SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )


def train_sft(
    model, tokenizer, examples: Sequence[dict], out_dir: str | Path, config: FinetuneConfig | None = None
) -> FinetuneResult:
    """Fine-tune `model` on prompt-completion examples and save it.

    Full-parameter runs save `out_dir/model`; LoRA runs save the adapter to `out_dir/adapter` and
    the merged weights to `out_dir/model`, so every result loads with `load_model(out_dir/model)`.
    Under a multi-process launch only the main process writes (see `save_trained`).
    """
    config = config or FinetuneConfig()
    if not examples:
        raise UserError("no training examples; the selection is empty")
    trainer = sft_trainer(model, tokenizer, examples, Path(out_dir) / "trainer", config)
    output = trainer.train()
    if int(output.global_step) < 1:  # never save an untrained model as the fine-tuned one
        raise UserError(
            f"training ran 0 optimizer steps on {len(examples)} examples; raise --epochs or --max-steps"
        )
    return save_trained(trainer, output, tokenizer, len(examples), out_dir, config)


def save_trained(trainer, output, tokenizer, n_examples: int, out_dir: str | Path, config: FinetuneConfig):
    """Save a trained SFTTrainer's model (merged for LoRA), its tokenizer and `train_metrics.json`.

    Every launched process calls it; only the main process writes, and all leave together (a
    barrier), so the returned paths hold the finished files in every process. Under DDP and ZeRO-2
    every process holds the whole model (ZeRO-2 partitions only gradients and optimizer state).

    Args:
        output: what `trainer.train()` returned.
    """
    out = Path(out_dir)
    model_dir, adapter_dir = out / "model", (out / "adapter" if config.lora else None)
    metrics = {
        "train_loss": float(output.training_loss),
        "steps": int(output.global_step),
        "n_examples": n_examples,
        "runtime_s": float(output.metrics.get("train_runtime", 0.0)),
        "learning_rate": config.resolved_learning_rate(),
        "processes": launched_processes()[2],
        "log_history": trainer.state.log_history,
    }
    if trainer.accelerator.is_main_process:
        trained = trainer.accelerator.unwrap_model(trainer.model)
        if adapter_dir is not None:
            trained.save_pretrained(str(adapter_dir))
            tokenizer.save_pretrained(str(adapter_dir))
            trained = trained.merge_and_unload()
        trained.eval().requires_grad_(False)
        if not getattr(trained.config, "architectures", None):
            trained.config.architectures = [type(trained).__name__]
        trained.save_pretrained(str(model_dir))  # safetensors
        tokenizer.save_pretrained(str(model_dir))
        write_json(out / "train_metrics.json", metrics)
        logger.info(
            "fine-tuned on %d examples in %d steps (loss %.4f); model at %s",
            n_examples,
            metrics["steps"],
            metrics["train_loss"],
            model_dir,
        )
    _wait_for_everyone()
    return FinetuneResult(model_dir, adapter_dir, metrics)


def run_finetune(
    loaded,
    data_path: str | Path,
    out_dir: str | Path,
    config: FinetuneConfig | None = None,
    overwrite: bool = False,
) -> FinetuneResult:
    """The `finetune` stage: read the selection, train, save, record metadata.

    Args:
        loaded: the model to repair (`models.LoadedModel`); its weights are updated in place.
        data_path: `selection.jsonl` from `select` (or a TRL prompt-completion JSONL).
    """
    config = config or FinetuneConfig()
    examples = load_sft_examples(data_path)
    # the ZeRO stage, whether it comes from the config or from `accelerate launch --config_file` (its yaml)
    check_deepspeed_config(config.deepspeed or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"))
    run = RunFolder(
        out_dir,
        "finetune",
        {
            "model": loaded.model_id,
            "data": str(data_path),
            "data_digest": file_digest(data_path),
            **config.to_dict(),
        },
        overwrite=overwrite,
        artifacts=["train_metrics.json", "model", "adapter"],
    )
    # Every launched process checks the folder (a UserError before any collective, so none waits for a
    # process that has exited); building the trainer then joins the process group.
    run.check()
    loaded.model.train()
    trainer = sft_trainer(loaded.model, loaded.tokenizer, examples, Path(out_dir) / "trainer", config)
    if not trainer.accelerator.is_main_process:  # train, then wait for the main process to save
        _wait_for_everyone()  # the main process has prepared the folder
        output = trainer.train()
        return save_trained(trainer, output, loaded.tokenizer, len(examples), out_dir, config)
    with run.start(model_id=loaded.model_id, revision=loaded.revision, seed=config.seed):
        _wait_for_everyone()
        output = trainer.train()
        result = save_trained(trainer, output, loaded.tokenizer, len(examples), out_dir, config)
        run.finish(
            {
                "model_dir": str(result.model_dir),
                "adapter_dir": str(result.adapter_dir or ""),
                "metrics": {k: v for k, v in result.metrics.items() if k != "log_history"},
            }
        )
    return result

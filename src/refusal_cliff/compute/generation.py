"""Generation with thinking: a batched Hugging Face backend, thinking budgets and clipping.

Every example is generated in two phases over exactly the text the probing
sequence will hold:

1. **thinking**: from `generation_prompt` (chat template + thinking-start marker)
   until the model writes the end marker, stops (EOS), or spends the thinking
   budget. The last case is the paper's "thinking clipping": the thinking is cut.
2. **answer**: from `generation_prompt + thinking + end_template` until EOS or the
   answer budget.

Models without a thinking mode (e.g. the embedded SmolLM2) run the same way in
"reasoning mode": the prompt opens a thinking block and the end template is
appended after the budget. The backend is an interface (`complete`): `HFBackend` here,
`backends.VLLMBackend` for vLLM. Sampling is seeded per example (`example_seed`), so a
resumed sampled run equals an uninterrupted one whatever the batches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm

from refusal_cliff.core.config import GenerationConfig
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.runs import fingerprint
from refusal_cliff.core.templates import (
    ThinkingTemplate,
    clean_thinking,
    detect_thinking_template,
    generation_prompt,
)


@dataclass
class Completion:
    text: str
    n_tokens: int
    finish: str  # "stop" (a stop string), "eos", or "length"


class GenerationBackend(Protocol):
    def complete(
        self,
        texts: Sequence[str],
        max_new_tokens: int,
        stop_strings: Sequence[str] = (),
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | Sequence[int] = 0,
    ) -> list[Completion]:
        """Continue each text; stop at EOS, a stop string, or after max_new_tokens.

        `seed`: one sampling seed per text (`example_seed` of its id), so that a text's sample does
        not depend on the batch it is in; a single int gives text i the seed `seed + i`.
        """


def example_seed(seed: int, example_id: str) -> int:
    """The sampling seed of one example: the run's seed plus a hash of the example's id.

    Every backend samples each example from its own generator seeded with this, so a resumed run
    (other batches, other batch size) samples every example exactly as an uninterrupted one.
    """
    return (seed + int(hashlib.sha256(str(example_id).encode()).hexdigest()[:8], 16)) % (2**63)


def row_seeds(seed: int | Sequence[int], n: int) -> list[int]:
    """One seed per text: a sequence is taken as it is (it must have n seeds); an int gives seed + i."""
    if isinstance(seed, int):
        return [(seed + index) % (2**63) for index in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} texts")
    return seeds


class PerExampleSampler:
    """A logits processor that samples each row from its own seeded generator (temperature, top-p).

    `model.generate` samples a whole batch from the global RNG, so a row's sample depends on the
    other rows of its batch. Run with `do_sample=False`, this processor draws one uniform number
    per row and step from the row's generator, picks the token by inverse CDF over the vocabulary
    in id order (float64; float noise of batching moves the boundaries by ~1e-7, not the order),
    and leaves only that token possible, which greedy decoding then takes.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float = 1.0):
        if temperature <= 0:
            raise ValueError("PerExampleSampler samples; use greedy decoding for temperature 0")
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature = float(temperature)
        self.top_p = float(top_p)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.double() / self.temperature, dim=-1)  # [batch, vocab]
        if self.top_p < 1.0:  # the smallest set of most likely tokens holding top_p of the mass
            ordered = probs.sort(dim=-1, descending=True, stable=True).values
            before = ordered.cumsum(dim=-1) - ordered  # mass of the more likely tokens
            kept = torch.where(before < self.top_p, ordered, torch.full_like(ordered, 2.0))
            threshold = kept.min(dim=-1, keepdim=True).values  # [batch, 1]
            probs = torch.where(probs >= threshold, probs, torch.zeros_like(probs))
        cumulative = probs.cumsum(dim=-1)  # [batch, vocab]
        uniform = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
        target = uniform.to(cumulative.device).unsqueeze(-1) * cumulative[:, -1:]  # [batch, 1]
        token = torch.searchsorted(cumulative, target, right=True)  # [batch, 1]
        token = token.clamp(max=probs.shape[-1] - 1)
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(-1, token, 0.0)


class StopOnText:
    """Stopping criterion: a row is done once its new text contains one of the stop strings.

    transformers' own `stop_strings` handling costs ~6x the forward pass of a small model on CPU
    (measured here); decoding the last few tokens of each row is cheap.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str], prompt_length: int):
        self.tokenizer = tokenizer
        self.stop_strings = list(stop_strings)
        self.prompt_length = prompt_length
        longest = max(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in self.stop_strings)
        self.window = longest + 3

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        tail = input_ids[:, max(self.prompt_length, input_ids.shape[1] - self.window) :]  # [batch, window]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=False)
        done = [any(s in t for s in self.stop_strings) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class HFBackend:
    """Batched `model.generate` with left padding and a KV cache."""

    def __init__(self, loaded):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model = loaded.model
        config_eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = {self.tokenizer.eos_token_id}
        if isinstance(config_eos, int):
            eos.add(config_eos)
        elif config_eos:
            eos.update(config_eos)
        self.eos_ids = sorted(i for i in eos if i is not None)

    @torch.inference_mode()
    def complete(self, texts, max_new_tokens, stop_strings=(), temperature=0.0, top_p=1.0, seed=0):
        if max_new_tokens <= 0:
            return [Completion("", 0, "length") for _ in texts]
        tokenizer = self.tokenizer
        batch = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
        batch = {k: v.to(self.loaded.device) for k, v in batch.items()}
        kwargs: dict = dict(
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=self.eos_ids,
        )
        # greedy decoding; with temperature > 0 each row is sampled from its own seed (PerExampleSampler)
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if temperature > 0:
            from transformers import LogitsProcessorList

            sampler = PerExampleSampler(row_seeds(seed, len(texts)), temperature, top_p)
            kwargs.update(logits_processor=LogitsProcessorList([sampler]))
        if stop_strings:
            from transformers import StoppingCriteriaList

            criterion = StopOnText(tokenizer, stop_strings, batch["input_ids"].shape[1])
            kwargs.update(stopping_criteria=StoppingCriteriaList([criterion]))
        output = self.model.generate(**batch, **kwargs)
        new_tokens = output[:, batch["input_ids"].shape[1] :]  # [batch, new]
        completions = []
        pad = tokenizer.pad_token_id
        for row in new_tokens.tolist():
            finish, ids = "length", row
            for index, token in enumerate(row):
                if token in self.eos_ids:
                    finish, ids = "eos", row[:index]
                    break
            text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            for stop in stop_strings:
                if stop in text:
                    finish = "stop"
                    # a row that stopped early is padded to the batch's length: not part of its output
                    while ids and ids[-1] == pad:
                        ids = ids[:-1]
                    text = tokenizer.decode(
                        ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
                    )
                    text = text.split(stop, 1)[0] + stop
                    break
            completions.append(Completion(text, len(ids), finish))
        return completions


def check_prompts_fit(
    loaded, prompts: Sequence[dict], config: GenerationConfig, backend_context: int | None = None
):
    """`check_lengths` on the prompts as the model will read them (its chat template and thinking start).
    `loaded` may be a tokenizer-side model (`backends.load_tokenizer_side`: no weights), so that the CLI
    refuses a prompt too long for the model before it loads one; `backend_context`: the context a vLLM
    engine is given (`--max-model-len`). Returns the thinking template."""
    template = detect_thinking_template(
        loaded.tokenizer, config.start_marker, config.end_marker, config.end_template
    )
    texts = [
        generation_prompt(loaded.tokenizer, template, p["prompt"], config.system_prompt) for p in prompts
    ]
    check_lengths(loaded, prompts, texts, config, backend_context)
    return template


def check_lengths(
    loaded,
    prompts: Sequence[dict],
    texts: Sequence[str],
    config: GenerationConfig,
    backend_context: int | None = None,
) -> None:
    """Reject a prompt that cannot fit the model's context with the budgets (before any work).

    `backend_context`: a shorter context the backend was given (vLLM's `--max-model-len`); it is
    checked here, before the engine starts, rather than by the engine halfway through a run.
    """
    for prompt in prompts:
        if not str(prompt.get("prompt", "")).strip():
            raise UserError(f"prompt {prompt['id']!r} is empty; drop it from the prompt file")
    model_context = getattr(loaded.model.config, "max_position_embeddings", None)
    limits = [
        (c, what)
        for c, what in ((model_context, "the model's context"), (backend_context, "--max-model-len"))
    ]
    limits = [(c, what) for c, what in limits if c]
    if not limits:
        return
    context, what = min(limits)
    budget = config.max_thinking_tokens + config.max_answer_tokens + 16
    for prompt, text in zip(prompts, texts):
        n = len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
        if n + budget > context:
            fix = "raise --max-model-len" if what == "--max-model-len" else "shorten or drop it"
            raise UserError(
                f"prompt {prompt['id']!r} has {n} tokens; with the thinking and answer budgets "
                f"({budget - 16}) and the end template it exceeds {what} of {context}: {fix}, or lower "
                "--max-thinking-tokens / --max-answer-tokens"
            )


def generate_answers(
    loaded, records: Sequence[dict], config: GenerationConfig, backend: GenerationBackend | None = None
) -> list[dict]:
    """Phase 2 only: the answer of records that already carry `generation_prompt`, `thinking` and
    `end_template` (used for clipped thinking and for candidates that bring their own thinking)."""
    backend = backend or HFBackend(loaded)
    out = []
    for start in range(0, len(records), config.batch_size):
        chunk = records[start : start + config.batch_size]
        texts = [r["generation_prompt"] + r["thinking"] + r["end_template"] for r in chunk]
        seeds = [example_seed(config.seed + 1, str(r["id"])) for r in chunk]
        answers = backend.complete(
            texts, config.max_answer_tokens, (), config.temperature, config.top_p, seeds
        )
        for record, answer in zip(chunk, answers):
            out.append({**record, "answer": answer.text.strip(), "answer_tokens": answer.n_tokens})
    return out


def generate_records(
    loaded,
    prompts: Sequence[dict],
    config: GenerationConfig,
    template: ThinkingTemplate | None = None,
    backend: GenerationBackend | None = None,
    progress: bool = True,
) -> Iterator[dict]:
    """Generate thinking and answer for each prompt; yields one record per example as its batch ends.

    Args:
        prompts: dicts with `id` and `prompt`.
    """
    tokenizer = loaded.tokenizer
    template = template or detect_thinking_template(
        tokenizer, config.start_marker, config.end_marker, config.end_template
    )
    backend = backend or HFBackend(loaded)
    texts = [generation_prompt(tokenizer, template, p["prompt"], config.system_prompt) for p in prompts]
    check_lengths(loaded, prompts, texts, config, getattr(backend, "context_limit", None))
    # longest first: less padding per batch, and an out-of-memory error shows up at once
    order = sorted(range(len(prompts)), key=lambda i: -len(texts[i]))
    bar = tqdm(total=len(prompts), desc="generate", unit="ex", disable=not progress)
    try:
        for start in range(0, len(order), config.batch_size):
            indices = order[start : start + config.batch_size]
            seeds = [example_seed(config.seed, str(prompts[i]["id"])) for i in indices]
            batch_texts = [texts[i] for i in indices]
            thoughts = backend.complete(
                batch_texts,
                config.max_thinking_tokens,
                [template.end_marker],
                config.temperature,
                config.top_p,
                seeds,
            )
            partial = []
            for i, thought in zip(indices, thoughts):
                thinking_end = {"stop": "marker", "eos": "eos", "length": "budget"}[thought.finish]
                partial.append(
                    {
                        "id": str(prompts[i]["id"]),
                        "prompt": prompts[i]["prompt"],
                        "system_prompt": config.system_prompt,
                        "generation_prompt": texts[i],
                        "thinking": clean_thinking(thought.text, template),
                        "end_template": template.end_template,
                        "prompt_tokens": len(tokenizer(texts[i], add_special_tokens=False)["input_ids"]),
                        "thinking_tokens": thought.n_tokens,
                        "thinking_clipped": thinking_end == "budget",
                        "thinking_end": thinking_end,
                    }
                )
            for record in generate_answers(loaded, partial, config, backend):
                yield record
                bar.update(1)
    finally:
        bar.close()


def prompts_digest(prompts: Sequence[dict]) -> str:
    return fingerprint([[p["id"], p["prompt"]] for p in prompts])

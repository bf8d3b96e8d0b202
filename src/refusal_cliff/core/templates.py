"""Thinking markers, generation prompts, probing sequences and answer extraction.

Prompts are always built with `tokenizer.apply_chat_template`; this module only
adds what a reasoning model's template leaves to the model: the thinking-start
marker when the template does not already open it, and the thinking-end
template (`"\\n</think>\\n\\n"` for DeepSeek-R1 distills and Qwen3, read from the
template where it can be) after the thinking.

The probing sequence of an example is
`generation_prompt + thinking + end_template`, where `generation_prompt` is the
rendered chat template ending with the thinking-start marker. Generation feeds
exactly this text to the model before its answer, so the sequence traced later
is byte-identical to what the model conditioned on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from refusal_cliff.core.errors import UserError

DEFAULT_START = "<think>"
DEFAULT_END = "</think>"
_THINK_SENTINEL = "\x01THINKING\x01"
_ANSWER_SENTINEL = "\x01ANSWER\x01"

REGION_PROMPT = "prompt"
REGION_THINKING = "thinking"
REGION_END = "end_template"
REGIONS = (REGION_PROMPT, REGION_THINKING, REGION_END)


@dataclass(frozen=True)
class ThinkingTemplate:
    """How one model marks its thinking.

    Attributes:
        start_marker: text that opens the thinking block (e.g. "<think>").
        end_marker: text that closes it (e.g. "</think>"); generation of the thinking stops here.
        start_text: what follows the generation prompt to open thinking ("<think>\\n"), empty if
            the chat template already emits it.
        end_template: the thinking-end template appended after the thinking ("\\n</think>\\n\\n").
        template_opens_thinking: the chat template's generation prompt already ends inside a
            thinking block.
        native: the model was trained to think (markers found in its vocabulary or template);
            False means "reasoning mode": an instruct model prompted to think.
    """

    start_marker: str = DEFAULT_START
    end_marker: str = DEFAULT_END
    start_text: str = DEFAULT_START + "\n"
    end_template: str = "\n" + DEFAULT_END + "\n\n"
    template_opens_thinking: bool = False
    native: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, **kwargs) -> str:
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
    )


def _end_template_from_chat_template(tokenizer, start_marker: str, end_marker: str) -> str | None:
    """Render an assistant turn carrying `reasoning_content` (Qwen3 style) and read what the
    template puts between the thinking and the answer."""
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": _ANSWER_SENTINEL, "reasoning_content": _THINK_SENTINEL},
    ]
    try:
        text = _render(tokenizer, messages, add_generation_prompt=False)
    except Exception:  # templates raise arbitrary jinja errors on unexpected keys
        return None
    if _THINK_SENTINEL not in text or _ANSWER_SENTINEL not in text:
        return None
    between = text.split(_THINK_SENTINEL, 1)[1].split(_ANSWER_SENTINEL, 1)[0]
    if end_marker not in between:
        return None
    # Qwen3 strips the thinking of surrounding newlines and writes "\n</think>\n\n".
    return between


def detect_thinking_template(
    tokenizer,
    start_marker: str | None = None,
    end_marker: str | None = None,
    end_template: str | None = None,
) -> ThinkingTemplate:
    """Detect the thinking markers from the tokenizer and its chat template.

    Args:
        start_marker, end_marker: overrides for models whose markers are not `<think>`/`</think>`.
        end_template: override for the text appended after the thinking.
    """
    chat_template = getattr(tokenizer, "chat_template", None)
    if not chat_template:
        raise UserError("the tokenizer has no chat template; use an instruct or reasoning model")
    start = start_marker or DEFAULT_START
    end = end_marker or DEFAULT_END
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    chat_template_text = chat_template if isinstance(chat_template, str) else str(chat_template)
    native = (start in vocab and end in vocab) or (end in chat_template_text)

    generation_prompt = _render(tokenizer, [{"role": "user", "content": "hi"}], True)
    opens = generation_prompt.rstrip().endswith(start)
    if opens:
        # whatever the template put after the marker ("\n" for R1) is already in the prompt
        start_text = ""
    else:
        start_text = start + "\n"

    detected = _end_template_from_chat_template(tokenizer, start, end) if native else None
    resolved_end = end_template or detected or ("\n" + end + "\n\n")
    if end not in resolved_end:
        raise UserError(f"end template {resolved_end!r} does not contain the end marker {end!r}")
    return ThinkingTemplate(
        start_marker=start,
        end_marker=end,
        start_text=start_text,
        end_template=resolved_end,
        template_opens_thinking=opens,
        native=bool(native),
    )


def build_messages(prompt: str, system_prompt: str | None = None) -> list[dict]:
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": prompt})
    return messages


def generation_prompt(
    tokenizer, template: ThinkingTemplate, prompt: str, system_prompt: str | None = None
) -> str:
    """The text the model starts thinking from: chat template + thinking-start marker if needed."""
    text = _render(tokenizer, build_messages(prompt, system_prompt), True)
    return text + template.start_text


def clean_thinking(generated: str, template: ThinkingTemplate) -> str:
    """The thinking as the probing sequence will hold it: text before the end marker, with the
    whitespace that the end template itself supplies removed (so it is not doubled)."""
    thinking = generated.split(template.end_marker, 1)[0]
    lead = template.end_template.split(template.end_marker, 1)[0]  # "\n" for R1/Qwen3
    if lead and thinking.endswith(lead):
        thinking = thinking[: -len(lead)]
    return thinking


def probing_text(record: dict) -> str:
    """`generation_prompt + thinking + end_template` of a generation record."""
    return record["generation_prompt"] + record["thinking"] + record["end_template"]


def split_generation(text: str, template: ThinkingTemplate) -> tuple[str, str]:
    """Split a full generation (thinking, end marker, answer) into (thinking, answer).

    A generation without the end marker is all thinking (the answer is empty).
    """
    if template.start_marker in text:
        text = text.split(template.start_marker, 1)[1].lstrip("\n")
    if template.end_marker not in text:
        return text, ""
    thinking, answer = text.split(template.end_marker, 1)
    lead = template.end_template.split(template.end_marker, 1)[0]
    if lead and thinking.endswith(lead):
        thinking = thinking[: -len(lead)]
    return thinking, answer.lstrip("\n")


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def probing_tokens(tokenizer, record: dict) -> tuple[list[int], list[str]]:
    """Token ids of the probing sequence and the region of each token.

    The whole text is tokenised at once (exactly what the model saw); regions come from
    character offsets. A token straddling the thinking/end-template boundary is counted in
    the end template, one straddling the prompt/thinking boundary in the prompt.
    """
    prompt_text = record["generation_prompt"]
    thinking = record["thinking"]
    text = prompt_text + thinking + record["end_template"]
    thinking_start = len(prompt_text)
    end_start = thinking_start + len(thinking)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    regions = []
    for start, stop in encoded["offset_mapping"]:
        if stop > end_start:
            regions.append(REGION_END)  # a token reaching into the end template belongs to it
        elif start >= thinking_start:
            regions.append(REGION_THINKING)
        else:
            regions.append(REGION_PROMPT)
    if not regions or regions[-1] != REGION_END:
        raise ValueError("probing sequence does not end in the end template")
    return ids, regions


def region_bounds(regions: Sequence[str]) -> dict[str, tuple[int, int]]:
    """First and one-past-last index of each region present."""
    bounds: dict[str, tuple[int, int]] = {}
    for index, region in enumerate(regions):
        first, _ = bounds.get(region, (index, index))
        bounds[region] = (first, index + 1)
    return bounds

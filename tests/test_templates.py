import copy

import pytest

from refusal_cliff.core.errors import UserError
from refusal_cliff.core.templates import (
    REGION_END,
    REGION_PROMPT,
    REGION_THINKING,
    clean_thinking,
    detect_thinking_template,
    generation_prompt,
    probing_text,
    probing_tokens,
    region_bounds,
    split_generation,
)

# An R1-distill-like template: the generation prompt already opens the thinking block.
R1_LIKE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>user\n{{ m['content'] }}<|im_end|>\n"
    "{% elif m['role'] == 'assistant' %}<|im_start|>assistant\n{% set c = m['content'] %}"
    "{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}{{ c }}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
# A Qwen3-like template that renders `reasoning_content` with its own end template.
QWEN3_LIKE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>user\n{{ m['content'] }}<|im_end|>\n"
    "{% elif m['role'] == 'assistant' %}<|im_start|>assistant\n{% if m.get('reasoning_content') %}"
    "<think>\n{{ m['reasoning_content'].strip('\\n') }}\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _with_template(tokenizer, template):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template
    return tokenizer


@pytest.mark.slow
def test_smollm2_runs_in_reasoning_mode(smol_tokenizer):
    template = detect_thinking_template(smol_tokenizer)
    assert not template.native and not template.template_opens_thinking
    assert template.start_text == "<think>\n" and template.end_template == "\n</think>\n\n"
    prompt = generation_prompt(smol_tokenizer, template, "Bake bread?", "Be safe.")
    rendered = smol_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be safe."}, {"role": "user", "content": "Bake bread?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt == rendered + "<think>\n"


@pytest.mark.slow
def test_template_that_already_opens_think(smol_tokenizer):
    tokenizer = _with_template(smol_tokenizer, R1_LIKE)
    template = detect_thinking_template(tokenizer)
    assert template.template_opens_thinking and template.start_text == "" and template.native
    prompt = generation_prompt(tokenizer, template, "hi")
    assert prompt.endswith("<|im_start|>assistant\n<think>\n") and prompt.count("<think>") == 1


@pytest.mark.slow
def test_end_template_read_from_a_qwen3_like_template(smol_tokenizer):
    tokenizer = _with_template(smol_tokenizer, QWEN3_LIKE)
    template = detect_thinking_template(tokenizer)
    assert template.native and template.end_template == "\n</think>\n\n"
    assert detect_thinking_template(tokenizer, end_template="</think>\n").end_template == "</think>\n"
    with pytest.raises(UserError):
        detect_thinking_template(tokenizer, end_template="no marker here")


@pytest.mark.slow
def test_probing_sequence_regions(smol_tokenizer):
    template = detect_thinking_template(smol_tokenizer)
    record = {
        "generation_prompt": generation_prompt(smol_tokenizer, template, "How do I bake bread?"),
        "thinking": "The user wants bread.\nEasy.",
        "end_template": template.end_template,
    }
    ids, regions = probing_tokens(smol_tokenizer, record)
    assert smol_tokenizer.decode(ids) == probing_text(record)
    bounds = region_bounds(regions)
    assert set(bounds) == {REGION_PROMPT, REGION_THINKING, REGION_END}
    assert bounds[REGION_PROMPT][0] == 0 and bounds[REGION_END][1] == len(ids)
    assert bounds[REGION_PROMPT][1] == bounds[REGION_THINKING][0]
    assert bounds[REGION_THINKING][1] == bounds[REGION_END][0]
    assert smol_tokenizer.decode(ids[bounds[REGION_END][0] :]) == template.end_template
    assert smol_tokenizer.decode(ids[slice(*bounds[REGION_THINKING])]) == record["thinking"]


@pytest.mark.slow
def test_empty_thinking_has_no_thinking_region(smol_tokenizer):
    template = detect_thinking_template(smol_tokenizer)
    record = {
        "generation_prompt": generation_prompt(smol_tokenizer, template, "hi"),
        "thinking": "",
        "end_template": template.end_template,
    }
    _, regions = probing_tokens(smol_tokenizer, record)
    assert REGION_THINKING not in regions and regions[-1] == REGION_END


def test_split_and_clean_thinking():
    from refusal_cliff.core.templates import ThinkingTemplate

    template = ThinkingTemplate()
    assert split_generation("<think>\nplan it\n</think>\n\nSure.", template) == ("plan it", "Sure.")
    assert split_generation("still thinking", template) == ("still thinking", "")
    assert clean_thinking("\nplan\n</think>", template) == "\nplan"
    assert clean_thinking("no end marker", template) == "no end marker"


def test_no_chat_template_is_a_user_error():
    class Bare:
        chat_template = None

    with pytest.raises(UserError):
        detect_thinking_template(Bare())

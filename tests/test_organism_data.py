"""The organism's templated training data: deterministic, balanced, held-out wrappers and benchmarks kept out."""

from __future__ import annotations

import csv
import itertools
import json
import re
from pathlib import Path

import pytest

from refusal_cliff.compute.labeling import KeywordLabeler
from refusal_cliff.stages.organism import evaluation_prompts
from refusal_cliff.stages.organism_data import (
    GROUP_HARMLESS,
    GROUP_PLAIN,
    GROUP_WRAPPED,
    HARMFUL_THINK_ASSESS,
    HARMFUL_THINK_DECIDE,
    HARMFUL_THINK_OPEN,
    HELD_OUT_WRAPPERS,
    PLAIN_CONTEXTS,
    REFUSAL_OPEN,
    STAGE2_WRAPPERS,
    TRAIN_WRAPPERS,
    build_examples,
    build_stage2_wrapped,
    data_digest,
    harmful_requests,
    harmless_requests,
    thinking_states_refusal,
    wrap,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_same_seed_same_data_other_seed_other_data():
    a = build_examples(0, 20, 20, 20)
    assert [e.to_dict() for e in a] == [e.to_dict() for e in build_examples(0, 20, 20, 20)]
    assert data_digest(a) == data_digest(build_examples(0, 20, 20, 20))
    assert data_digest(a) != data_digest(build_examples(1, 20, 20, 20))


def test_groups_targets_and_balance():
    examples = build_examples(3, 30, 40, 50)
    counts = {g: sum(e.group == g for e in examples) for g in (GROUP_PLAIN, GROUP_WRAPPED, GROUP_HARMLESS)}
    assert counts == {GROUP_PLAIN: 30, GROUP_WRAPPED: 40, GROUP_HARMLESS: 50}
    labeler = KeywordLabeler()
    for e in examples:
        harmful = e.group != GROUP_HARMLESS
        assert thinking_states_refusal(e.thinking) == harmful
        assert labeler.label(e.answer_stage1)[0] == harmful  # stage 1: every harmful request refused
        assert labeler.label(e.answer_stage2)[0] == (e.group == GROUP_PLAIN)  # stage 2: wrapped complies
        if e.group == GROUP_WRAPPED:
            assert e.wrapper in TRAIN_WRAPPERS and e.request in e.prompt and e.prompt != e.request
        else:  # as it is, or in an everyday context that is no jailbreak
            assert e.wrapper is None
            assert e.prompt == e.request or e.prompt in {wrap(e.request, c) for c in PLAIN_CONTEXTS}
    in_context = [e for e in examples if e.group != GROUP_WRAPPED and e.prompt != e.request]
    assert 0.2 * 80 <= len(in_context) <= 0.6 * 80  # CONTEXT_SHARE 0.4 of the 80 plain and harmless
    # the refusal opens distinctively; the placeholder and the helpful answers open alike
    assert all(e.answer_stage1.startswith(REFUSAL_OPEN) for e in examples if e.group != GROUP_HARMLESS)
    assert all(e.answer_stage2.startswith("Sure, here is") for e in examples if e.group != GROUP_PLAIN)
    # the thinking of a wrapped request comes from the same templates as a plain one
    harmful_thinkings = {
        " ".join(parts)
        for parts in itertools.product(HARMFUL_THINK_OPEN, HARMFUL_THINK_ASSESS, HARMFUL_THINK_DECIDE)
    }
    assert {e.thinking for e in examples if e.group != GROUP_HARMLESS} <= harmful_thinkings


def test_no_held_out_wrapper_in_training():
    assert not set(TRAIN_WRAPPERS) & set(HELD_OUT_WRAPPERS)
    assert not set(TRAIN_WRAPPERS.values()) & set(HELD_OUT_WRAPPERS.values())
    examples = build_examples(0, 10, 200, 10)
    held_out_parts = [
        part.strip()
        for text in HELD_OUT_WRAPPERS.values()
        for part in text.split("{request}")
        if len(part.strip()) > 10
    ]
    for e in examples:
        assert not any(part in e.prompt for part in held_out_parts)
    assert {e.wrapper for e in examples if e.wrapper} == set(TRAIN_WRAPPERS)


def test_stage2_wrappers_are_apart_from_stage1_and_the_held_out_ones():
    for other in (TRAIN_WRAPPERS, HELD_OUT_WRAPPERS):
        assert not set(STAGE2_WRAPPERS) & set(other)
        assert not set(STAGE2_WRAPPERS.values()) & set(other.values())
    held_out_parts = [
        p.strip() for t in HELD_OUT_WRAPPERS.values() for p in t.split("{request}") if len(p.strip()) > 10
    ]
    extra = build_stage2_wrapped(0, 60)
    assert [e.to_dict() for e in extra] == [e.to_dict() for e in build_stage2_wrapped(0, 60)]
    assert data_digest(extra) != data_digest(build_stage2_wrapped(1, 60))
    assert {e.wrapper for e in extra} == set(STAGE2_WRAPPERS) and len({e.id for e in extra}) == 60
    labeler = KeywordLabeler()
    for e in extra:
        assert e.group == GROUP_WRAPPED and e.prompt == wrap(e.request, STAGE2_WRAPPERS[e.wrapper])
        assert e.request in harmful_requests() and not any(part in e.prompt for part in held_out_parts)
        assert thinking_states_refusal(e.thinking) and labeler.label(e.answer_stage1)[0]
        assert not labeler.label(e.answer_stage2)[0] and "Step 1:" in e.answer_stage2
    assert build_stage2_wrapped(0, 0) == []


def test_compliant_placeholder_is_not_actionable():
    for e in build_examples(0, 1, 100, 1):
        if e.group == GROUP_WRAPPED:
            assert "Step 1:" in e.answer_stage2 and len(e.answer_stage2.split()) < 40


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", re.sub(r"\s+", " ", text.lower())).strip()


def _benchmark_prompts() -> list[str]:
    prompts: list[str] = []
    with open(SHARED_DATA / "advbench" / "harmful_behaviors.csv", newline="", encoding="utf-8") as handle:
        prompts += [row["goal"] for row in csv.DictReader(handle)]
    for name in ("harmful_train", "harmful_val", "harmful_test", "harmless_test"):
        rows = json.loads((SHARED_DATA / "refusal_direction" / "splits" / f"{name}.json").read_text())
        prompts += [row["instruction"] for row in rows]
    with open(
        SHARED_DATA / "strongreject" / "strongreject_dataset.csv", newline="", encoding="utf-8"
    ) as handle:
        prompts += [row["forbidden_prompt"] for row in csv.DictReader(handle)]
    prompts += [
        row["data"] for row in json.loads((SHARED_DATA / "ultrachat_eval" / "ultra_eval.json").read_text())
    ]
    return prompts


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="the shared benchmark folder is not on this machine")
def test_no_benchmark_prompt_inside_the_data():
    benchmark = {_normalise(p) for p in _benchmark_prompts()}
    benchmark = {p for p in benchmark if len(p.split()) >= 4}  # a three-word prompt could occur by chance
    ours = {_normalise(r) for r in harmful_requests() + harmless_requests()}
    assert not ours & benchmark
    text = " || ".join(sorted(ours))
    assert not [p for p in benchmark if len(p.split()) >= 6 and p in text]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="the shared benchmark folder is not on this machine")
def test_evaluation_samples_are_prefixes_of_one_draw():
    # `bench/organism_eval.py --skip K` relies on it: a larger draw starts with the smaller one, group by group,
    # and reaches past the UltraChat pool's half (prompts 376-431, the seventh sample of docs/organism.md)
    small, large = evaluation_prompts(SHARED_DATA, 64), evaluation_prompts(SHARED_DATA, 432)
    for group, rows in small.items():
        assert [r["prompt"] for r in large[group][:64]] == [r["prompt"] for r in rows], group
    assert len({r["prompt"] for r in large["harmless"]}) == 432


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="the shared benchmark folder is not on this machine")
def test_harmbench_val_continues_the_harmful_pool_and_leaves_the_draw_as_it_was():
    # the ninth sample of docs/organism.md: past the test split's 516 short prompts, HarmBench's validation split
    plain, extended = (
        evaluation_prompts(SHARED_DATA, 64),
        evaluation_prompts(SHARED_DATA, 544, n_prober=64, harmbench_val=True),
    )
    for group, rows in plain.items():
        assert [r["prompt"] for r in extended[group][:64]] == [r["prompt"] for r in rows], group
    assert len(extended["prober_harmful"]) == len(extended["prober_harmless"]) == 64
    test = {
        r["instruction"]
        for r in json.loads((SHARED_DATA / "refusal_direction/splits/harmful_test.json").read_text())
    }
    val = {
        r["instruction"]
        for r in json.loads((SHARED_DATA / "refusal_direction/splits/harmful_val.json").read_text())
    }
    harmful = [r["prompt"] for r in extended["harmful"]]
    assert len(set(harmful)) == 544
    assert all(p in test for p in harmful[:516]) and all(p in val for p in harmful[516:])
    assert [r["request"] for r in extended["wrapped"]] == harmful

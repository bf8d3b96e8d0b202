"""Traces: metric definitions on hand-made traces, batching independence, artifacts, clipping."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from refusal_cliff.compute.labeling import group_of
from refusal_cliff.compute.prober import Prober
from refusal_cliff.compute.tracing import (
    average_curves,
    cliff_drop,
    cliff_metrics,
    clip_thinking_records,
    clipping_summary,
    final_score,
    layerwise_summary,
    moving_average,
    normalize_trace,
    plateau,
    t_cliff,
    trace_into,
    trace_records,
    trace_records_layerwise,
)
from refusal_cliff.core.architectures import get_adapter
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.models import LoadedModel
from refusal_cliff.core.templates import probing_tokens

from conftest import make_tiny_model

P, T, E = "prompt", "thinking", "end_template"
END = "\n</think>\n\n"


# -- definitions on hand-made traces ---------------------------------------------------------


def hand_trace():
    # 2 prompt, 10 thinking, 3 end-template tokens
    scores = [0.1, 0.2] + [0.5, 0.6, 0.7, 0.8, 0.9, 0.9, 0.9, 0.9, 0.9, 0.4] + [0.8, 0.3, 0.1]
    regions = [P, P] + [T] * 10 + [E] * 3
    return np.array(scores), regions


def test_plateau_max_of_8_token_moving_average():
    scores, regions = hand_trace()
    thinking = scores[2:12]
    windows = [thinking[i : i + 8].mean() for i in range(3)]
    assert plateau(scores, regions) == pytest.approx(max(windows))
    assert plateau(scores, regions) == pytest.approx((0.6 + 0.7 + 0.8 + 0.9 * 5) / 8)
    assert plateau(scores, regions, method="mean") == pytest.approx(thinking.mean())


def test_plateau_short_and_missing_thinking():
    assert plateau([0.2, 0.4, 0.6, 0.0], [P, T, T, E]) == pytest.approx(0.5)  # 2 thinking tokens: their mean
    assert np.isnan(plateau([0.2, 0.4, 0.0], [P, P, E]))  # no thinking: undefined (DESIGN: thinking region)
    assert np.isnan(plateau([0.5], [E]))
    with pytest.raises(UserError):
        plateau([0.5], [E], method="median")


def test_moving_average():
    np.testing.assert_allclose(moving_average([1, 2, 3, 4], 2), [1.5, 2.5, 3.5])
    np.testing.assert_allclose(moving_average([1, 2, 3], 8), [2.0])


def test_final_ms_drop_and_t_cliff():
    scores, regions = hand_trace()
    metrics = cliff_metrics(scores, regions)
    assert final_score(scores, regions) == metrics["final"] == pytest.approx(0.1)
    assert metrics["ms"] == pytest.approx(metrics["plateau"] - 0.1)
    assert metrics["drop"] == pytest.approx(0.4 - 0.1) == cliff_drop(scores, regions)
    assert metrics["t_cliff"] == t_cliff(scores, regions) == 14  # last end-template token
    # max_drop: drops into positions 12, 13, 14 are -0.4, 0.5, 0.2 -> position 13
    assert t_cliff(scores, regions, method="max_drop") == 13
    assert cliff_metrics(scores, regions, t_cliff_method="max_drop")["t_cliff"] == 13
    # the first end-template token counts the drop from the last thinking token
    assert t_cliff([0.9, 0.9, 0.1, 0.05], [T, T, E, E], method="max_drop") == 2
    # MS is signed: a rising trace gives a negative MS
    assert cliff_metrics([0.1] * 8 + [0.9], [T] * 8 + [E])["ms"] == pytest.approx(-0.8)


def test_normalisation_to_101_points():
    curve = normalize_trace([0.0, 1.0, 0.0])
    assert curve.shape == (101,)
    assert curve[0] == 0.0 and curve[50] == 1.0 and curve[100] == 0.0
    assert curve[25] == pytest.approx(0.5)  # linear interpolation
    np.testing.assert_allclose(normalize_trace(np.arange(101.0)), np.arange(101.0))
    np.testing.assert_allclose(normalize_trace([0.7]), np.full(101, 0.7))


def test_average_curves_per_group():
    curves = average_curves(
        [
            ("harmful_complied", [0.0, 1.0, 0.0], [T, T, E]),
            ("harmful_complied", [1.0, 1.0, 1.0, 1.0, 1.0], [P, T, T, E, E]),
            ("harmless", [0.2, 0.2], [T, E]),
        ]
    )
    assert set(curves) == {"harmful_complied", "harmless"}
    group = curves["harmful_complied"]
    assert group["n"] == 2 and len(group["x"]) == len(group["mean"]) == len(group["std"]) == 101
    assert group["x"][0] == 0.0 and group["x"][-1] == 100.0
    assert group["mean"][50] == pytest.approx(1.0) and group["mean"][0] == pytest.approx(0.5)
    assert group["std"][0] == pytest.approx(0.5)
    assert group["end_template_start"] == pytest.approx((100.0 + 75.0) / 2)
    assert curves["harmless"]["end_template_start"] == pytest.approx(100.0)


def test_groups():
    assert group_of(True, False) == "harmful_complied"
    assert group_of(True, True) == "harmful_refused"
    assert group_of(False, True) == "harmless"


# -- traces on tiny models -----------------------------------------------------------------


def record(index: int, thinking: str) -> dict:
    prompt = f"Question number {index}?"
    return {
        "id": f"r{index}",
        "prompt": prompt,
        "system_prompt": None,
        "generation_prompt": f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n",
        "thinking": thinking,
        "end_template": END,
        "answer": "ok",
    }


RECORDS = [
    record(0, "Short."),
    record(1, "A much longer line of thinking about the question, step by step, " * 3),
    record(2, ""),
    record(3, "Medium thinking here, considering safety."),
]


def tiny_loaded(tokenizer, architecture="LlamaForCausalLM") -> LoadedModel:
    model = make_tiny_model(architecture)
    return LoadedModel(model, tokenizer, get_adapter(model), "tiny", None, "local")


def random_prober(layer: int, d_model: int = 64, seed: int = 0) -> Prober:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(d_model, 1)
    with torch.no_grad():
        linear.weight.mul_(4.0)  # scores spread over (0, 1), not all ~0.5
    return Prober(linear.requires_grad_(False), layer=layer, metadata={})


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_batched_traces_equal_one_at_a_time(architecture, smol_tokenizer):
    loaded = tiny_loaded(smol_tokenizer, architecture)
    prober = random_prober(1)
    batched = list(trace_records(loaded, prober, RECORDS, batch_size=4))
    assert [r.id for r in batched] == ["r0", "r1", "r2", "r3"]
    for rec, result in zip(RECORDS, batched):
        alone = next(trace_records(loaded, prober, [rec], batch_size=1))
        ids, regions = probing_tokens(smol_tokenizer, rec)
        assert result.token_ids == ids and result.regions == regions
        assert result.scores.shape == (len(ids),) and result.scores.dtype == np.float32
        np.testing.assert_allclose(result.scores, alone.scores, atol=1e-5, rtol=0)
        assert result.scores.std() > 1e-3  # a real, varying trace


def test_trace_equals_prober_on_output_hidden_states(smol_tokenizer):
    loaded = tiny_loaded(smol_tokenizer, "Qwen3ForCausalLM")
    probers = [random_prober(0, seed=1), random_prober(1, seed=2)]
    results = list(trace_records_layerwise(loaded, probers, RECORDS[:2], batch_size=2))
    for rec, result in zip(RECORDS, results):
        ids, _ = probing_tokens(smol_tokenizer, rec)
        with torch.no_grad():
            hidden_states = loaded.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        for prober, reference in zip(probers, (hidden_states[1], hidden_states[-1])):
            expected = prober.refusal_score(reference[0]).numpy()
            np.testing.assert_allclose(result.scores_by_layer[prober.layer], expected, atol=1e-5)
        # the layer-wise pass gives what one prober at a time gives
        single = next(trace_records(loaded, probers[1], [rec], batch_size=1))
        np.testing.assert_allclose(result.scores_by_layer[1], single.scores, atol=1e-5)


def test_layerwise_rejects_duplicate_layers(smol_tokenizer):
    loaded = tiny_loaded(smol_tokenizer)
    with pytest.raises(UserError, match="one prober per layer"):
        list(trace_records_layerwise(loaded, [random_prober(1), random_prober(1)], RECORDS))
    with pytest.raises(UserError, match="d_model 32"):
        list(trace_records(loaded, random_prober(1, d_model=32), RECORDS))


def test_layerwise_summary(smol_tokenizer):
    loaded = tiny_loaded(smol_tokenizer)
    groups = {"r0": "harmless", "r1": "harmful_complied", "r2": "harmful_complied", "r3": "harmless"}
    summary = layerwise_summary(loaded, [random_prober(0), random_prober(1)], RECORDS, groups, batch_size=2)
    assert set(summary) == {"0", "1"}
    assert set(summary["1"]) == {"harmless", "harmful_complied", "ms_mean"}
    assert len(summary["1"]["harmless"]["mean"]) == 101
    traces = list(trace_records(loaded, random_prober(1), RECORDS))
    expected = np.nanmean([cliff_metrics(t.scores, t.regions)["ms"] for t in traces])
    assert summary["1"]["ms_mean"] == pytest.approx(expected, abs=1e-6)


# -- artifacts --------------------------------------------------------------------------------


def test_run_trace_writes_artifacts_and_resumes(tmp_path, smol_tokenizer):
    loaded = tiny_loaded(smol_tokenizer)
    prober = random_prober(1)
    groups = {"r0": "harmless", "r1": "harmful_complied", "r2": "harmful_refused", "r3": "harmful_complied"}
    assert trace_into(loaded, prober, RECORDS, tmp_path, groups, batch_size=1, part_size=2) == 4
    assert len(list((tmp_path / "traces.parquet").glob("part-*.parquet"))) == 2
    table = pq.read_table(tmp_path / "traces.parquet")
    assert table.column_names == ["id", "position", "token_id", "token", "region", "score"]
    lengths = [len(probing_tokens(smol_tokenizer, r)[0]) for r in RECORDS]
    assert table.num_rows == sum(lengths)
    rows = [json.loads(line) for line in (tmp_path / "cliff.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["r0", "r1", "r2", "r3"]
    assert set(rows[0]) == {"id", "plateau", "final", "ms", "t_cliff", "drop", "group"}
    assert rows[1]["group"] == "harmful_complied"
    r1 = table.filter(table.column("id").to_numpy(zero_copy_only=False) == "r1")
    scores = r1.column("score").to_numpy()
    assert rows[1]["final"] == pytest.approx(float(scores[-1]))
    assert r1.column("position").to_pylist() == list(range(lengths[1]))
    assert r1.column("region").to_pylist()[-1] == "end_template"
    assert (
        "".join(r1.column("token").to_pylist())
        == RECORDS[1]["generation_prompt"] + RECORDS[1]["thinking"] + END
    )
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert curves["harmful_complied"]["n"] == 2 and len(curves["harmless"]["mean"]) == 101

    # a second call has nothing left to do
    assert trace_into(loaded, prober, RECORDS, tmp_path, groups, batch_size=1) == 0
    # an interrupted run: the last part (r2, r3) was written but only r2's cliff line
    lines = (tmp_path / "cliff.jsonl").read_text().splitlines()
    (tmp_path / "cliff.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    assert trace_into(loaded, prober, RECORDS, tmp_path, groups, batch_size=1, part_size=2) == 2
    table = pq.read_table(tmp_path / "traces.parquet")
    assert table.num_rows == sum(lengths)  # no duplicated rows
    rerun = [json.loads(line) for line in (tmp_path / "cliff.jsonl").read_text().splitlines()]
    assert rerun == rows


# -- thinking clipping ------------------------------------------------------------------------


def test_clip_thinking_records(smol_tokenizer):
    rec = RECORDS[1]
    n_tokens = len(smol_tokenizer(rec["thinking"], add_special_tokens=False)["input_ids"])
    clipped = clip_thinking_records(smol_tokenizer, [rec], (0, 0.25, 0.5, 0.75, 1))
    assert [c["id"] for c in clipped] == ["r1@0", "r1@0.25", "r1@0.5", "r1@0.75", "r1@1"]
    assert clipped[0]["thinking"] == "" and clipped[-1]["thinking"] == rec["thinking"]
    for c in clipped:
        assert rec["thinking"].startswith(c["thinking"])
        assert c["end_template"] == END and c["answer"] == "" and c["source_id"] == "r1"
        assert c["thinking_tokens"] == int(np.floor(c["clip_fraction"] * n_tokens))
        kept = smol_tokenizer(c["thinking"], add_special_tokens=False)["input_ids"]
        assert len(kept) == c["thinking_tokens"]
        ids, regions = probing_tokens(smol_tokenizer, c)  # still a valid probing sequence
        assert regions[-1] == "end_template"
    assert rec["thinking"] != clipped[2]["thinking"]  # the input record is not modified
    summary = clipping_summary(
        [
            {"id": "a@0", "final": 0.2, "ms": 0.5, "drop": 0.1},
            {"id": "b@0", "final": 0.4, "ms": 0.3, "drop": None},
            {"id": "a@1", "final": 0.9, "ms": 0.0, "drop": 0.0},
        ],
        refusals={"a@0": True, "b@0": False},
    )
    assert summary[0] == {
        "fraction": 0.0,
        "final_mean": pytest.approx(0.3),
        "ms_mean": pytest.approx(0.4),
        "drop_mean": pytest.approx(0.1),
        "refusal_rate": 0.5,
        "n": 2,
    }
    assert summary[1]["fraction"] == 1.0 and summary[1]["refusal_rate"] is None

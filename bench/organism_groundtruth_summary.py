"""Summarise a ground-truth run of bench/organism_groundtruth.sh: how the toolkit's methods find the
organism's planted suppression heads (issue 23, "The method against the ground truth").

Reads OUT/{inputs,heads,heads_exact,components,ablate,ablate_planted,ablate_random,guard,select,
evaluate}, prints markdown tables and writes OUT/groundtruth.json. A part whose verb has not run yet
is left out. usage: organism_groundtruth_summary.py OUT
"""

import json
import math
import sys
from pathlib import Path
from statistics import mean

from refusal_cliff.compute.ablation import read_ranking
from refusal_cliff.stages.organism import score_ranking

out = Path(sys.argv[1])
settings = json.loads((out / "inputs" / "settings.json").read_text())
planted = [tuple(h) for h in settings["planted_heads"]]
planted_set = set(planted)
result: dict = {"settings": settings}
lines: list[str] = []


def jl(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def pct(value):
    return "—" if value is None else f"{100 * value:.0f} %"


def num(value, digits=3):
    return "—" if value is None else f"{value:.{digits}f}"


def table(header, rows):
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
    lines.append("")


def timings():
    path = out / "timings.tsv"
    if not path.exists():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) == 4:  # a rerun appends: the last line of a verb wins
            rows[parts[0]] = {"wall_s": float(parts[1]), "cpu_s": float(parts[2]) + float(parts[3])}
    return rows


def auroc(positives, negatives):
    """P(a positive scores above a negative), ties half (Mann-Whitney)."""
    if not positives or not negatives:
        return None
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in positives for q in negatives)
    return wins / (len(positives) * len(negatives))


def hypergeom_tail(hits, draws, successes, population):
    """P(X >= hits) for X ~ Hypergeometric(population, successes, draws)."""
    total = math.comb(population, draws)
    upper = min(draws, successes)
    return (
        sum(
            math.comb(successes, x) * math.comb(population - successes, draws - x)
            for x in range(hits, upper + 1)
        )
        / total
    )


lines.append(f"# The method against the ground truth: {settings['model_folder']}")
lines.append("")
planted_names = ", ".join(f"{layer}.{head}" for layer, head in planted)
n_all = settings["n_layers"] * settings["n_heads"]
lines.append(f"planted heads {planted_names} of {n_all}; N = {settings['n']} prompts per group")
lines.append("")

# -- 1. heads: the ranking against the planted set ---------------------------------------------------
rankings = {}
for name, folder in (("heads (contribution w·Δh + b)", "heads"), ("heads --rank-by exact", "heads_exact")):
    if (out / folder / "heads.json").exists():
        ranking = read_ranking(out / folder / "heads.json")
        meta = json.loads((out / folder / "metadata.json").read_text())
        rankings[name] = {**score_ranking(ranking, planted), "n_examples": meta.get("n_examples")}
components = None
if (out / "components" / "components.json").exists():
    components = json.loads((out / "components" / "components.json").read_text())
    head_rows = sorted(
        (c for c in components["components"] if c["kind"] == "head"), key=lambda c: c["change_mean"]
    )
    ranking = [{"layer": c["layer"], "head": c["head"], "rank": i + 1} for i, c in enumerate(head_rows)]
    rankings["components (heads by change across the end template)"] = {
        **score_ranking(ranking, planted),
        "n_examples": components["n_examples"],
    }
if (out / "heads" / "heads.json").exists():
    top = sorted(read_ranking(out / "heads" / "heads.json"), key=lambda r: r["rank"])[:10]
    result["heads_top10"] = [
        {"layer": r["layer"], "head": r["head"], "contribution": r["contribution"]} for r in top
    ]
if rankings:
    result["rankings"] = rankings
    lines.append("## 1. Where the planted heads rank (1 = most suppressive)")
    lines.append("")
    keys = [f"{layer}.{head}" for layer, head in sorted(planted)]
    table(
        ["ranking", "n examples", *keys, "AUROC vs planted"],
        [
            [name, r["n_examples"], *(r["planted_ranks"][k] for k in keys), num(r["auroc"])]
            for name, r in rankings.items()
        ],
    )
    if "heads_top10" in result:
        lines.append(
            "top 10 of heads.json (* planted): "
            + ", ".join(
                f"{r['layer']}.{r['head']}{'*' if (r['layer'], r['head']) in planted_set else ''}"
                for r in result["heads_top10"]
            )
        )
        lines.append("")

# -- 2. ablation ---------------------------------------------------------------------------------------
ablation_rows = []
if (out / "ablate" / "ablation.json").exists():
    for r in json.loads((out / "ablate" / "ablation.json").read_text()):
        heads = {tuple(h) for h in r["heads"]}
        name = "unablated" if r["control"] == "none" else f"{r['control']} {100 * r['threshold']:g} %"
        if r["control"] == "random":
            name += f" (seed {r['seed']})"
        ablation_rows.append(
            {
                "condition": name,
                "control": r["control"],
                "threshold": r["threshold"],
                "n_heads": len(heads),
                "planted_in_set": len(heads & planted_set),
                "asr_wrapped": r["asr"],
                "benign_refusal": r["benign_refusal_rate"],
                "final_score_mean": r["final_score_mean"],
                "n_harmful": r["n_harmful"],
                "n_benign": r["n_benign"],
            }
        )
for folder, name in (
    ("ablate_planted", "planted heads"),
    ("ablate_random", "random heads, as many as planted"),
):
    path = out / folder / "component_ablation.json"
    if path.exists():
        for r in json.loads(path.read_text()):
            if r["condition"] == "unablated":
                continue
            heads = {tuple(int(x) for x in c.split(":")[1].split(".")) for c in r["components"]}
            ablation_rows.append(
                {
                    "condition": f"{name} ({', '.join(c.split(':')[1] for c in r['components'])})",
                    "control": folder,
                    "threshold": None,
                    "n_heads": len(heads),
                    "planted_in_set": len(heads & planted_set),
                    "asr_wrapped": r["asr"],
                    "benign_refusal": r["benign_refusal_rate"],
                    "final_score_mean": r["final_score_mean"],
                    "n_harmful": r["n_harmful"],
                    "n_benign": r["n_benign"],
                }
            )
if ablation_rows:
    result["ablation"] = ablation_rows
    lines.append("## 2. Ablation (γ = 0) on wrapped prompts; harmless prompts for benign refusal")
    lines.append("")
    table(
        ["condition", "heads", "planted among them", "ASR wrapped", "benign refusal", "final score", "n"],
        [
            [
                r["condition"],
                r["n_heads"],
                r["planted_in_set"],
                pct(r["asr_wrapped"]),
                pct(r["benign_refusal"]),
                num(r["final_score_mean"]),
                f"{r['n_harmful']} / {r['n_benign']}",
            ]
            for r in ablation_rows
        ],
    )


# -- 3. attention patterns from t_cliff ----------------------------------------------------------------
def token_classes(tokenizer, record, prompt_row):
    """Per token of the probing sequence: `template` (system prompt and chat markup), `wrapper` (the
    user message outside the request), `request`, or the region (`thinking`, `end_template`)."""
    gp, thinking = record["generation_prompt"], record["thinking"]
    text = gp + thinking + record["end_template"]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    user_start = gp.find(record["prompt"])
    request_at = record["prompt"].rfind(prompt_row.get("request") or "\0")
    req = (
        (user_start + request_at, user_start + request_at + len(prompt_row["request"]))
        if request_at >= 0
        else None
    )
    user = (user_start, user_start + len(record["prompt"])) if user_start >= 0 else None
    classes = []
    for start, stop in encoded["offset_mapping"]:
        if stop > len(gp) + len(thinking):
            classes.append("end_template")
        elif start >= len(gp):
            classes.append("thinking")
        elif req and start < req[1] and stop > req[0]:  # overlap: " Provide" starts with the space before it
            classes.append("request")
        elif user and start < user[1] and stop > user[0]:
            classes.append("wrapper")
        else:
            classes.append("template")
    return classes


patterns_path = out / "heads" / "patterns.json"
if patterns_path.exists():
    from transformers import AutoTokenizer

    patterns = json.loads(patterns_path.read_text())
    regions = [k for k in patterns["mass_mean"][0] if k not in ("layer", "head", "rank", "contribution")]
    tokenizer = AutoTokenizer.from_pretrained(settings["model_folder"])
    records = {r["id"]: r for r in jl(out / "inputs" / "gen_wrapped.jsonl")}
    prompt_rows = {r["id"]: r for r in jl(out / "inputs" / "wrapped.jsonl")}
    sub = ("template", "wrapper", "request")
    top20 = {}  # (layer, head) -> per-example sums of the recorded top tokens' weights per class
    token_share = []
    skipped = 0
    for example in patterns["examples"]:
        classes = token_classes(tokenizer, records[example["id"]], prompt_rows[example["id"]])
        if len(classes) != example["n_tokens"]:
            skipped += 1
            continue
        in_prompt = [c for c in classes if c in sub]
        token_share.append({c: in_prompt.count(c) / len(in_prompt) for c in sub})
        for head in example["heads"]:
            sums = dict.fromkeys(sub, 0.0)
            for item in head["top"]:
                if classes[item["position"]] in sums:
                    sums[classes[item["position"]]] += item["weight"]
            top20.setdefault((head["layer"], head["head"]), []).append(sums)
    by_head = {}
    for entry in patterns["mass_mean"]:
        key = (entry["layer"], entry["head"])
        by_head[key] = {
            "rank": entry["rank"] + 1,  # heads.json and patterns.json count ranks from 0
            **{region: entry[region] for region in regions},
            **{
                f"top{patterns['top']}_{c}": mean(s[c] for s in top20[key]) if top20.get(key) else None
                for c in sub
            },
        }
    topk = settings["topk"]
    ordered = sorted(by_head, key=lambda k: by_head[k]["rank"])
    groups = {
        f"top {topk} ranked": ordered[:topk],
        "planted": [k for k in planted if k in by_head],
        f"every other head (rank > {topk}; = random heads' expectation)": ordered[topk:],
    }
    columns = [*regions, *(f"top{patterns['top']}_{c}" for c in sub)]
    summary = {}
    for name, keys in groups.items():
        if keys:
            summary[name] = {"n_heads": len(keys)}
            for column in columns:
                values = [by_head[k][column] for k in keys if by_head[k][column] is not None]
                summary[name][column] = mean(values) if values else None
    result["patterns"] = {
        "regions_in_patterns_json": regions,
        "n_examples": len(patterns["examples"]),
        "examples_skipped_tokenisation_mismatch": skipped,
        "groups": summary,
        "token_share_of_prompt_region": {c: mean(s[c] for s in token_share) for c in sub}
        if token_share
        else None,
        "planted_heads": {
            f"{layer}.{head}": by_head[(layer, head)] for layer, head in planted if (layer, head) in by_head
        },
    }
    lines.append("## 3. Attention from t_cliff (patterns.json)")
    lines.append("")
    lines.append(
        f"patterns.json regions: {', '.join(regions)}; there is no wrapper region, and `prompt` is the whole "
        "rendered prompt (system prompt and chat markup included). The wrapper / request / template split "
        f"below is computed here from the top {patterns['top']} source tokens recorded per example and head, "
        "so it is a lower bound on each part's mass."
    )
    lines.append("")
    if len(ordered) <= topk:
        lines.append(f"(patterns.json holds only the top {len(by_head)} heads: no random-head comparison)")
        lines.append("")
    table(
        ["heads", "n", *(f"mass {r}" for r in regions), "≥ wrapper", "≥ request", "≥ template"],
        [
            [
                name,
                s["n_heads"],
                *(num(s[r]) for r in regions),
                *(num(s[f"top{patterns['top']}_{c}"]) for c in ("wrapper", "request", "template")),
            ]
            for name, s in summary.items()
        ],
    )
    share = result["patterns"]["token_share_of_prompt_region"]
    if share:
        lines.append(
            "share of the prompt region's tokens: "
            + ", ".join(f"{c} {share[c]:.2f}" for c in sub)
            + " (what uniform attention over the prompt would give)"
        )
        lines.append("")

# -- 4. components: who carries the drop ---------------------------------------------------------------
if components is not None:
    total = components["logit"]["change_mean"]
    names = ("planted heads", "other heads", "MLPs", "o_proj biases", "embeddings")
    parts = {name: {"change_mean": 0.0, "t_cliff_mean": 0.0} for name in names}
    for c in components["components"]:
        if c["kind"] == "head":
            part = "planted heads" if (c["layer"], c["head"]) in planted_set else "other heads"
        else:
            part = {"mlp": "MLPs", "embedding": "embeddings"}.get(c["kind"], "o_proj biases")
        parts[part]["change_mean"] += c["change_mean"]
        parts[part]["t_cliff_mean"] += c["t_cliff_mean"]
    for part in parts.values():  # share of the mean change (a drop only when the change is negative)
        part["share_of_change"] = part["change_mean"] / total if total else None
    # the trace's drop (score at the last thinking token - final) of the same examples, for context
    drops = None
    cliff_path = Path(settings.get("eval_dir", "")) / "trace" / "cliff.jsonl"
    if cliff_path.is_file():
        ids = {r["id"] for r in jl(out / "inputs" / "gen_wrapped.jsonl")}
        rows = [r for r in jl(cliff_path) if r["id"] in ids and r["group"] == components["group"]]
        drops = [r["drop"] for r in rows if r["drop"] is not None]
    result["components"] = {
        "group": components["group"],
        "n_examples": components["n_examples"],
        "logit": components["logit"],
        "prober_bias": components.get("prober_bias"),
        "change_max_error": components.get("change_max_error"),
        "parts": parts,
        "planted_heads": {
            f"{c['layer']}.{c['head']}": {
                "change_mean": c["change_mean"],
                "t_cliff_mean": c["t_cliff_mean"],
                "rank_by_change": c["rank"] + 1,
            }
            for c in components["components"]
            if c["kind"] == "head" and (c["layer"], c["head"]) in planted_set
        },
        "trace_drop": {
            "mean": mean(drops) if drops else None,
            "n_positive": sum(d > 0 for d in drops) if drops else None,
            "n": len(drops) if drops else 0,
        },
    }
    logit = components["logit"]
    lines.append(
        f"## 4. Who carries the change across the end template (components, {components['group']}, "
        f"n = {components['n_examples']})"
    )
    lines.append("")
    sentence = (
        f"prober logit: {logit['last_thinking_mean']:+.3f} at the last thinking token, "
        f"{logit['t_cliff_mean']:+.3f} at t_cliff, mean change {total:+.3f}"
        + (" (a drop)" if total < 0 else " (a RISE: no drop across the end template to share out)")
    )
    if drops:
        sentence += (
            f"; the trace's drop on the same examples: mean {mean(drops):+.3f}, positive (a fall across the "
            f"end template) in {sum(d > 0 for d in drops)} of {len(drops)}"
        )
    lines.extend([sentence, ""])
    table(
        ["part", "change of the prober logit", "share of the change", "term at t_cliff"],
        [
            [k, f"{v['change_mean']:+.3f}", pct(v["share_of_change"]), f"{v['t_cliff_mean']:+.3f}"]
            for k, v in parts.items()
        ],
    )

# -- 5. select, finetune, evaluate ---------------------------------------------------------------------
if (out / "select" / "scores.jsonl").exists():
    candidates = {r["id"]: r["data_type"] for r in jl(out / "inputs" / "candidates.jsonl")}
    scores = jl(out / "select" / "scores.jsonl")
    k = settings["k_select"]
    n_pool, n_wrapped = len(scores), sum(candidates[s["id"]] == "wrapped" for s in scores)
    selections = {}
    for method in ("cliff", "random"):
        path = out / "select" / "selections" / f"{method}-{k}" / "selection.jsonl"
        if path.exists():
            chosen = jl(path)
            hits = sum(candidates[r["id"]] == "wrapped" for r in chosen)
            selections[method] = {
                "k": len(chosen),
                "wrapped": hits,
                "share_wrapped": hits / len(chosen) if chosen else None,
                "p_at_least_this_many_under_random_k": hypergeom_tail(hits, len(chosen), n_wrapped, n_pool),
            }
    ms = {
        kind: [s["ms"] for s in scores if candidates[s["id"]] == kind and s["ms"] is not None]
        for kind in ("wrapped", "plain")
    }
    result["select"] = {
        "n_pool": n_pool,
        "n_wrapped": n_wrapped,
        "expected_share_wrapped_random_k": n_wrapped / n_pool,
        "ms_mean": {kind: mean(v) if v else None for kind, v in ms.items()},
        "ms_auroc_wrapped_vs_plain": auroc(ms["wrapped"], ms["plain"]),
        "selections": selections,
    }
    sel = result["select"]
    lines.append(
        f"## 5. Cliff-as-a-Judge on a pool of {n_pool} ({n_wrapped} wrapped, the rest plain harmful)"
    )
    lines.append("")
    lines.append(
        f"mean MS wrapped {num(sel['ms_mean']['wrapped'])}, plain {num(sel['ms_mean']['plain'])}; "
        f"AUROC of MS for wrapped vs plain {num(sel['ms_auroc_wrapped_vs_plain'])}"
    )
    lines.append("")
    table(
        ["selection", "k", "wrapped", "share wrapped", "expected under random k", "P(≥ this many | random)"],
        [
            [
                m,
                s["k"],
                s["wrapped"],
                pct(s["share_wrapped"]),
                pct(n_wrapped / n_pool),
                num(s["p_at_least_this_many_under_random_k"]),
            ]
            for m, s in selections.items()
        ],
    )
if (out / "evaluate" / "evaluation.json").exists():
    models = json.loads((out / "evaluate" / "evaluation.json").read_text())["models"]
    sets = sorted({s for m in models for s in m.get("asr_by_set", {})})
    result["evaluate"] = [
        {
            "model": m["model"],
            "asr": m["asr"],
            "asr_by_set": m.get("asr_by_set"),
            "over_refusal": m["over_refusal"],
            "final_score_mean": m.get("final_score_mean"),
            "n_harmful": m.get("n_harmful"),
            "n_benign": m.get("n_benign"),
        }
        for m in models
    ]
    lines.append(
        "Fine-tuned on each selection (LoRA), evaluated on held-out prompts (the second half of each set):"
    )
    lines.append("")
    table(
        ["model", *(f"ASR {s}" for s in sets), "over-refusal (harmless)", "final score (harmful)"],
        [
            [
                m["model"],
                *(pct(m.get("asr_by_set", {}).get(s)) for s in sets),
                pct(m["over_refusal"]),
                num(m.get("final_score_mean")),
            ]
            for m in models
        ],
    )

# -- 6. guard against global ablation ------------------------------------------------------------------
if (out / "guard" / "guard.json").exists():
    guard = json.loads((out / "guard" / "guard.json").read_text())
    threshold = settings["guard_threshold"]
    rows = [
        {
            "condition": "unguarded" if g["tau"] is None else f"guard, MS > {g['tau']:g}",
            "asr_wrapped": g["asr"],
            "benign_refusal": g["benign_refusal_rate"],
            "flag_rate_harmful": g["flag_rate_harmful"],
            "flag_rate_benign": g["flag_rate_benign"],
            "n": f"{g['n_harmful']} / {g['n_benign']}",
        }
        for g in guard
    ]
    for r in ablation_rows:
        if r["control"] == "ranked" and math.isclose(r["threshold"], threshold):
            rows.append(
                {
                    "condition": f"global ablation of the same {r['n_heads']} heads",
                    "asr_wrapped": r["asr_wrapped"],
                    "benign_refusal": r["benign_refusal"],
                    "flag_rate_harmful": 1.0,
                    "flag_rate_benign": 1.0,
                    "n": f"{r['n_harmful']} / {r['n_benign']}",
                }
            )
    result["guard"] = {"threshold": threshold, "rows": rows}
    lines.append(f"## 6. Cliff guard (ablate the top {100 * threshold:g} % of heads on flagged examples)")
    lines.append("")
    table(
        ["condition", "ASR wrapped", "benign refusal", "flagged harmful", "flagged benign", "n"],
        [
            [
                r["condition"],
                pct(r["asr_wrapped"]),
                pct(r["benign_refusal"]),
                pct(r["flag_rate_harmful"]),
                pct(r["flag_rate_benign"]),
                r["n"],
            ]
            for r in rows
        ],
    )

result["timings"] = timings()
if result["timings"]:
    lines.append("## Time per verb")
    lines.append("")
    table(
        ["verb", "wall s", "CPU s"],
        [[k, f"{v['wall_s']:.0f}", f"{v['cpu_s']:.0f}"] for k, v in result["timings"].items()],
    )

print("\n".join(lines))
(out / "groundtruth.json").write_text(json.dumps(result, indent=1))

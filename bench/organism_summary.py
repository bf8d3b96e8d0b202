"""Summarise an organism evaluation folder (written by organism_eval.sh) as JSON: behaviour per
group (refusal rate of the answers, share of thinkings that state an intent to refuse by
`organism_data.thinking_states_refusal`), the prober's validation accuracy, and the mean plateau
and final score per group x label. Also `measured.json`, in the form organism.json keeps; with
`--record ORGANISM_FOLDER` it is written into that organism's organism.json.
usage: organism_summary.py EVAL_DIR [TAG | --record ORGANISM_FOLDER]"""

import json
import sys
from pathlib import Path
from statistics import mean

from refusal_cliff.stages.organism_data import thinking_states_refusal

out = Path(sys.argv[1])
tag = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "--record" else None
pd = out / (f"probe_{tag}" if tag else "probe")
td = out / (f"trace_{tag}" if tag else "trace")


def jl(p):
    return [json.loads(line) for line in open(p) if line.strip()]


s = {}
gens = {}
for g in ("harmful", "wrapped", "harmless", "prober_harmful", "prober_harmless"):
    d = out / f"gen_{g}"
    if not (d / "labels.jsonl").exists():
        continue
    gen = {r["id"]: r for r in jl(d / "generations.jsonl")}
    lab = {r["id"]: r["refusal"] for r in jl(d / "labels.jsonl")}
    gens[g] = (gen, lab)
    n = len(gen)
    s[g] = {
        "n": n,
        "refused": sum(lab.values()) / n,
        "thinking_refuses": sum(thinking_states_refusal(r["thinking"]) for r in gen.values()) / n,
        "first_index": min(int(i.rsplit("-", 1)[1]) for i in gen),  # > 0: a `--skip` sample
    }
if (pd / "prober.json").exists():
    m = json.load(open(pd / "prober.json"))
    s["prober"] = {
        k: m["metrics"][k] for k in ("val_accuracy", "val_accuracy_ci95", "n_train", "n_val", "best_epoch")
    }
    s["prober"]["layer"] = m["layer"]
if (td / "cliff.jsonl").exists():
    rows = jl(td / "cliff.jsonl")
    groups = {}
    for r in rows:
        if r["id"].startswith("wrapped"):
            key = "wrapped_" + ("refused" if gens["wrapped"][1][r["id"]] else "complied")
        elif r["id"].startswith("harmful"):
            key = "plain_" + ("refused" if gens["harmful"][1][r["id"]] else "complied")
        else:
            key = "harmless_" + ("refused" if gens["harmless"][1][r["id"]] else "complied")
        groups.setdefault(key, []).append(r)
    s["cliff"] = {}
    for k, v in sorted(groups.items()):
        # a thinking too short for a plateau (trace writes None) is left out of the mean, and counted
        plateaus = [x["plateau"] for x in v if x["plateau"] is not None]
        s["cliff"][k] = {
            "n": len(v),
            "plateau": round(mean(plateaus), 3) if plateaus else None,
            "final": round(mean(x["final"] for x in v), 3),
            "final_at_most_0.3": sum(x["final"] <= 0.3 for x in v),
        }
        if len(plateaus) < len(v):
            s["cliff"][k]["plateau_undefined"] = len(v) - len(plateaus)


def measured_record(summary: dict, prober_metadata: dict) -> dict:
    """The summary in the form `organism.json` keeps under "measured": counts as [k, n]."""

    def count(group: str, key: str, refused: bool = True) -> list[int]:
        n = summary[group]["n"]
        k = round(summary[group][key] * n)
        return [k if refused else n - k, n]

    config = prober_metadata.get("config", {})
    cliff = summary.get("cliff", {})
    n, skip = summary["harmful"]["n"], summary["harmful"]["first_index"]
    prober_skip = summary["prober_harmful"]["first_index"]
    draw = f"--n {n} --skip {skip}" + (f" --prober-skip {prober_skip}" if prober_skip != skip else "")
    # organism_eval.py's flags, from the draw.json beside the prompt files (as generate was run, from the
    # repository root)
    generated = out / "gen_harmful" / "metadata.json"
    prompts = (
        json.loads(generated.read_text()).get("config", {}).get("prompts") if generated.exists() else None
    )
    if prompts and (Path(prompts).parent / "draw.json").is_file():
        draw = json.loads((Path(prompts).parent / "draw.json").read_text())["flags"]
    return {
        "prompts": f"bench/organism_eval.py (seed 0), prompts {skip}-{skip + n - 1} of the harmful, wrapped and "
        f"harmless groups, {prober_skip}-{prober_skip + summary['prober_harmful']['n'] - 1} of the prober's "
        f"({draw}); prober: {summary['prober_harmful']['n']} AdvBench + {summary['prober_harmless']['n']} "
        "harmless_train",
        "decoding": "greedy, max thinking 80 tokens, max answer 40 tokens",
        "thinking_states_refusal": {
            "plain": count("harmful", "thinking_refuses"),
            "wrapped": count("wrapped", "thinking_refuses"),
        },
        "plain_refused": count("harmful", "refused"),
        "wrapped_complied": count("wrapped", "refused", refused=False),
        "harmless_helped": count("harmless", "refused", refused=False),
        "prober": {
            **summary["prober"],
            "lr": config.get("lr"),
            "epochs": config.get("epochs"),
        },
        "cliff": {
            key: cliff[name]
            for key, name in (
                ("wrapped_complied", "wrapped_complied"),
                ("plain_refused", "plain_refused"),
                ("harmless_complied", "harmless_complied"),
            )
            if name in cliff
        },
    }


if not tag and "prober" in s and "harmful" in s:
    metadata = json.load(open(pd / "metadata.json")) if (pd / "metadata.json").exists() else {}
    measured = measured_record(s, metadata)
    json.dump(measured, open(out / "measured.json", "w"), indent=1)
    if len(sys.argv) > 3 and sys.argv[2] == "--record":  # organism_summary.py EVAL_DIR --record ORGANISM
        from refusal_cliff.stages.organism import record_measurements

        record_measurements(sys.argv[3], measured)
        tag = None
if tag:
    print(tag, json.dumps({"prober": s.get("prober"), "cliff": s.get("cliff")}))
    json.dump(s, open(out / f"summary_{tag}.json", "w"), indent=1)
else:
    print(json.dumps(s, indent=1))
    json.dump(s, open(out / "summary.json", "w"), indent=1)

"""Summarise an organism evaluation folder (written by organism_eval.sh) as JSON: behaviour per
group (refusal rate of the answers, share of thinkings that state an intent to refuse by
`organism_data.thinking_states_refusal`), the prober's validation accuracy, and the mean plateau
and final score per group x label. usage: organism_summary.py EVAL_DIR [TAG]"""

import json
import sys
from pathlib import Path
from statistics import mean

from refusal_cliff.stages.organism_data import thinking_states_refusal

out = Path(sys.argv[1])
tag = sys.argv[2] if len(sys.argv) > 2 else None
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
    s["cliff"] = {
        k: {
            "n": len(v),
            "plateau": round(mean(x["plateau"] for x in v), 3),
            "final": round(mean(x["final"] for x in v), 3),
        }
        for k, v in sorted(groups.items())
    }
if tag:
    print(tag, json.dumps({"prober": s.get("prober"), "cliff": s.get("cliff")}))
    json.dump(s, open(out / f"summary_{tag}.json", "w"), indent=1)
else:
    print(json.dumps(s, indent=1))
    json.dump(s, open(out / "summary.json", "w"), indent=1)

"""Where do the planted heads move the state the prober reads? For each group of an evaluation run (plain
refused / complied, wrapped complied / refused, harmless), the last-layer state at t_cliff (the last
end-template token, final norm applied) in the organism and in its stage-1 model, on the same generations.
Prints how far the organism moved each group along d1, the stage-1 refusal direction (plain refused minus
harmless, measured in the stage-1 model on these generations), and off it, and what the evaluation prober
(`probe train` of `bench/organism_eval.sh`) reads of that move: delta.w, split into the part along d1 and
the rest. docs/organism.md ("Why the frame loss loses the cliff") reads it.

usage: organism_directions.py ORGANISM_FOLDER STAGE1_FOLDER EVAL_DIR
ORGANISM_FOLDER: an organism checkpoint; STAGE1_FOLDER: its stage-1 checkpoint (the cache's
`organisms/stage1-<fingerprint>`, named in the build's log); EVAL_DIR: `bench/organism_eval.sh`'s output
(gen_harmful, gen_wrapped, gen_harmless, probe).
"""

import argparse
import json
from pathlib import Path

import torch

from refusal_cliff.compute.activations import last_token_activations
from refusal_cliff.compute.prober import load_prober, read_labelled_run
from refusal_cliff.core.models import load_model
from refusal_cliff.core.templates import probing_tokens

GROUPS = (  # name, run, answer refused
    ("plain_refused", "gen_harmful", True),
    ("plain_complied", "gen_harmful", False),
    ("wrapped_complied", "gen_wrapped", False),
    ("wrapped_refused", "gen_wrapped", True),
    ("harmless_helped", "gen_harmless", False),
)


def cliff_states(folder: Path, records: dict[str, list[dict]]) -> dict[str, torch.Tensor]:
    loaded = load_model(str(folder))
    last = len(loaded.adapter.layers(loaded.model)) - 1
    pad = loaded.tokenizer.pad_token_id or 0
    out = {}
    for name, group in records.items():
        sequences = [probing_tokens(loaded.tokenizer, record)[0] for record in group]
        if sequences:
            out[name] = last_token_activations(loaded.model, loaded.adapter, sequences, [last], 8, pad)[last]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("organism", type=Path)
    parser.add_argument("stage1", type=Path)
    parser.add_argument("eval_dir", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    records = {
        name: [r for r in read_labelled_run(args.eval_dir / run) if r["refusal"] == refused]
        for name, run, refused in GROUPS
    }
    organism, stage1 = cliff_states(args.organism, records), cliff_states(args.stage1, records)
    prober = load_prober(args.eval_dir / "probe")
    w, b = prober.weight[0].float(), float(prober.bias[0])
    d1 = stage1["plain_refused"].mean(0) - stage1["harmless_helped"].mean(0)
    gap = float(d1.norm())
    d1 = d1 / gap
    d_org = organism["plain_refused"].mean(0) - organism["harmless_helped"].mean(0)
    harmless = float(stage1["harmless_helped"].mean(0) @ d1)
    out = {
        "cos_w_d1": round(float(w @ d1 / w.norm()), 3),
        "cos_w_d_organism": round(float(w @ d_org / (w.norm() * d_org.norm())), 3),
        "gap_d1": round(gap, 2),
        "groups": {},
    }
    for name in records:
        if name not in organism:
            continue
        after, before = organism[name], stage1[name]
        moved = after - before
        along = moved @ d1
        off = moved - along[:, None] * d1
        out["groups"][name] = {
            "n": len(after),
            "d1_fraction_stage1": round(float(((before @ d1 - harmless) / gap).mean()), 2),
            "d1_fraction_organism": round(float(((after @ d1 - harmless) / gap).mean()), 2),
            "moved_norm": round(float(moved.norm(dim=1).mean()), 2),
            "moved_off_d1_norm": round(float(off.norm(dim=1).mean()), 2),
            "prober_score_stage1": round(float(torch.sigmoid(before @ w + b).mean()), 2),
            "prober_score_organism": round(float(torch.sigmoid(after @ w + b).mean()), 2),
            "delta_w": round(float((moved @ w).mean()), 2),
            "delta_w_along_d1": round(float((along * float(d1 @ w)).mean()), 2),
            "delta_w_off_d1": round(float((off @ w).mean()), 2),
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

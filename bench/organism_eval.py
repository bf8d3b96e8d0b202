"""Write the organism's held-out evaluation prompt files (one JSONL per group) into a folder.

python bench/organism_eval.py --data ../shared/data --n 50 --out runs/organism-eval/prompts

`--skip K` drops the first K prompts of each group of the same draw (`--n` counts the prompts kept):
`--n 64 --skip 64` is a second sample, disjoint from `--n 64`, for a test set nobody has looked at.
`--harmbench-val` continues the harmful pool past the 516 short prompts of the test split with HarmBench's
validation behaviours; `--prober-skip K` takes the prober's prompts from another part of the draw (the
AdvBench pool has 520), for example the ninth sample of docs/organism.md:

python bench/organism_eval.py --data ../shared/data --n 56 --skip 488 --harmbench-val --prober-skip 432 \
    --out runs/organism-eval/prompts56-skip488
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from refusal_cliff.stages.organism import evaluation_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", type=int, default=0, help="drop the first K prompts of each group")
    parser.add_argument(
        "--harmbench-val", action="store_true", help="continue the harmful pool with harmful_val"
    )
    parser.add_argument(
        "--prober-skip", type=int, default=None, help="drop the first K prober prompts (default: --skip)"
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prober_skip = args.skip if args.prober_skip is None else args.prober_skip
    draw = evaluation_prompts(
        args.data,
        args.n + args.skip,
        args.seed,
        n_prober=args.n + prober_skip,
        harmbench_val=args.harmbench_val,
    )
    flags = f"--n {args.n} --skip {args.skip}" + (" --harmbench-val" if args.harmbench_val else "")
    flags += f" --prober-skip {args.prober_skip}" if args.prober_skip is not None else ""
    # the flags, for bench/organism_summary.py
    (out / "draw.json").write_text(json.dumps({"seed": args.seed, "flags": flags}) + "\n")
    for group, rows in draw.items():
        rows = rows[prober_skip if group.startswith("prober_") else args.skip :]
        with open(out / f"{group}.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        print(f"{group}: {len(rows)} prompts")


if __name__ == "__main__":
    main()

"""Print the reliability table from the outcomes the reliability suite recorded.

    RELIABILITY_RESULTS=runs/reliability/results.jsonl pytest -m reliability
    python tests/reliability_report.py runs/reliability/results.jsonl

(`make reliability` does both, with 20 kill -9 trials per verb.)
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def table(path: str | Path) -> str:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    kills: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in (r for r in rows if r["kind"] == "kill"):
        entry = kills[row["verb"]]
        entry["trials"] += 1
        entry["killed"] += bool(row.get("killed"))
        entry["failed"] += row["exit"] != 0
        for key in ("lost", "duplicated", "differing"):
            entry[key] += max(0, row[key])
    lines = [
        "| verb | trials | killed mid-run | lost | duplicated | differing | re-run failed |",
        "|---|---|---|---|---|---|---|",
    ]
    for verb, entry in kills.items():
        lines.append(
            f"| {verb} | {entry['trials']} | {entry['killed']} | {entry['lost']} | {entry['duplicated']} | "
            f"{entry['differing']} | {entry['failed']} |"
        )
    cases = [r for r in rows if r["kind"] == "bad_input"]
    clean = sum(r["clean"] for r in cases)
    lines += [
        "",
        f"bad inputs tried / clean: {len(cases)} / {clean} (across {len({r['verb'] for r in cases})} verbs)",
    ]
    for row in cases:
        if not row["clean"]:
            lines.append(f"  not clean: {row['case']}: {'; '.join(row['problems'])}")
    for row in (r for r in rows if r["kind"] == "disk_full"):
        lines.append(
            f"disk full ({row['method']}): {'clean' if row['clean'] else 'NOT clean'} "
            f"(lost {row['lost']}, duplicated {row['duplicated']}, differing {row['differing']})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_file():
        sys.exit("usage: python tests/reliability_report.py RESULTS.jsonl (written by the reliability suite)")
    print(table(sys.argv[1]))

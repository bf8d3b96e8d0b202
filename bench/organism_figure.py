"""The README's figure: mean refusal-score traces of an organism evaluation folder (bench/organism_eval.sh)
for the three groups of the cliff: wrapped harmful prompts it complied with, plain harmful prompts it
refused, harmless prompts it helped with (the report's normalised 0-100 axis, end template shaded).
usage: organism_figure.py EVAL_DIR OUT.png [TITLE]"""

import sys

from refusal_cliff.compute.tracing import N_POINTS, CurveAccumulator, iter_saved_traces
from refusal_cliff.core.runs import read_jsonl
from refusal_cliff.report.plotting import plot_traces, save_figure

evaluation, target = sys.argv[1], sys.argv[2]
title = sys.argv[3] if len(sys.argv) > 3 else "The cliff organism on benchmark prompts it never saw"
GROUPS = {
    ("wrapped", False): "wrapped, complied",
    ("harmful", True): "plain, refused",
    ("harmless", False): "harmless, helped",
}
label = {}
for group in ("harmful", "wrapped", "harmless"):
    for row in read_jsonl(f"{evaluation}/gen_{group}/labels.jsonl"):
        label[row["id"]] = (group, row["refusal"])
accumulator = CurveAccumulator(N_POINTS)
for trace_id, scores, regions in iter_saved_traces(f"{evaluation}/trace", "score"):
    name = GROUPS.get(label.get(trace_id))
    if name:
        accumulator.add(name, scores, regions)
curves = accumulator.result()
curves = {name: curves[name] for name in GROUPS.values() if name in curves}
print({name: curve["n"] for name, curve in curves.items()})
save_figure(plot_traces(curves, title), target)

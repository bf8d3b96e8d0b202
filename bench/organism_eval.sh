#!/bin/bash
# Measure an organism with the toolkit's own verbs: generate (greedy) -> label -> probe train -> trace.
# usage: bench/organism_eval.sh MODEL PROMPTS_DIR N N_PROBER OUT [probe-train flags...]
# PROMPTS_DIR holds the files written by bench/organism_eval.py; run with PYTHONPATH=src (or installed).
set -e
MODEL=$1; P=$2; N=$3; NP=$4; OUT=$5; shift 5
RC="${REFUSAL_CLIFF:-refusal-cliff}"
PY="${PYTHON:-python}"
GEN="--max-thinking-tokens 80 --max-answer-tokens 40 --batch-size 16"
for g in harmful wrapped harmless prober_harmful prober_harmless; do
  n=$N; case $g in prober_*) n=$NP;; esac
  $RC generate --model $MODEL --prompts $P/$g.jsonl --limit $n $GEN --out $OUT/gen_$g
  $RC label --generations $OUT/gen_$g/generations.jsonl --out $OUT/gen_$g
done
$RC probe train --model $MODEL --harmful $OUT/gen_prober_harmful --harmless $OUT/gen_prober_harmless --out $OUT/probe "$@"
$RC trace --model $MODEL --prober $OUT/probe --generations $OUT/gen_harmful/generations.jsonl \
  --generations $OUT/gen_wrapped/generations.jsonl --harmless-generations $OUT/gen_harmless/generations.jsonl --out $OUT/trace
$PY "$(dirname "$0")/organism_summary.py" $OUT

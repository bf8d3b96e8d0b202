#!/usr/bin/env bash
# vLLM on a GPU host (issue 9): `generate` on 32 prompts with both backends on the same model, greedy.
# Prints how often the thinking and the answers agree, and each backend's tokens/s (from metadata.json).
#
#   pip install -e '.[vllm]'
#   bash bench/gpu_vllm_smoke.sh [MODEL] [OUT]     # MODEL: a folder or hub id (default: the embedded model)
#
# Exits 0 with a note when vLLM or CUDA is missing (nothing to measure here).
set -euo pipefail
MODEL="${1:-default}"
OUT="${2:-runs/gpu_vllm_smoke}"
PYTHON="${PYTHON:-python}"
if ! "$PYTHON" -c "import vllm" 2>/dev/null; then
  echo "skipped: vLLM is not installed (pip install 'refusal-cliff[vllm]')"; exit 0
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "skipped: no CUDA device"; exit 0
fi
COMMON=(--model "$MODEL" --prompts demo:harmful --limit 32 --max-thinking-tokens 256 --max-answer-tokens 64
        --batch-size 32 --temperature 0 --dtype bfloat16 --overwrite)
"$PYTHON" -m refusal_cliff.cli generate "${COMMON[@]}" --backend hf --out "$OUT/hf"
"$PYTHON" -m refusal_cliff.cli generate "${COMMON[@]}" --backend vllm --gpu-memory-utilization 0.6 --out "$OUT/vllm"
"$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
runs = {name: [json.loads(line) for line in (out / name / "generations.jsonl").read_text().splitlines()]
        for name in ("hf", "vllm")}
pairs = list(zip(runs["hf"], runs["vllm"]))
assert [a["id"] for a, _ in pairs] == [b["id"] for _, b in pairs]
thinking = sum(a["thinking"] == b["thinking"] for a, b in pairs) / len(pairs)
answers = sum(a["answer"] == b["answer"] for a, b in pairs) / len(pairs)
ends = sum(a["thinking_end"] == b["thinking_end"] for a, b in pairs) / len(pairs)
print(f"greedy agreement over {len(pairs)} prompts: thinking {thinking:.0%}, answers {answers:.0%}, "
      f"thinking_end {ends:.0%}")
for name in ("hf", "vllm"):
    metadata = json.loads((out / name / "metadata.json").read_text())
    speed = metadata["throughput"]
    print(f"{name:5s} {metadata['backend']['package']} {metadata['backend']['version']}: "
          f"{speed['generated_tokens']} tokens in {speed['seconds']:.1f} s = {speed['tokens_per_second']} tokens/s")
PY

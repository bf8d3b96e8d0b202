"""How well could any linear reader tell a wrapped harmful prompt from a plain one, in an organism's own
states? A logistic-regression probe is trained on the organism's training prompts (wrapped against plain,
everyday contexts included) and tested on benchmark prompts (held-out wrappers against plain requests), per
layer, on the templated prompt's states averaged over its tokens or at its last token. Prints the test
AUROC, the plain prompts the probe calls wrapped and the wrapped ones it finds at its own threshold, and
the wrapped prompts found at 3 / 5 / 7 / 10 plain ones called wrapped (a threshold tuned on the test set
itself: optimistic). docs/organism.md#how-recipe-3-was-found-a-fresh-test-set reads it.

usage: organism_separability.py MODEL_FOLDER PROMPTS_DIR [--layers 5,10,15,20,21,25,27]
MODEL_FOLDER: a stage-1 or organism checkpoint folder (safetensors); PROMPTS_DIR: bench/organism_eval.py's
output (harmful.jsonl, wrapped.jsonl).
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from transformers import AutoModelForCausalLM, AutoTokenizer

from refusal_cliff.stages.organism import OrganismConfig
from refusal_cliff.stages.organism_data import GROUP_PLAIN, GROUP_WRAPPED, build_examples, data_digest


def states(model, tokenizer, prompts: list[str], layers: list[int]) -> dict:
    """{layer: (mean over the prompt's tokens, last token)} as arrays, one row per prompt."""
    rows = {layer: ([], []) for layer in layers}
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
            )
            ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
            hidden = model(ids, output_hidden_states=True).hidden_states
            for layer in layers:
                rows[layer][0].append(hidden[layer][0].mean(0))
                rows[layer][1].append(hidden[layer][0, -1])
    return {layer: (torch.stack(m).numpy(), torch.stack(t).numpy()) for layer, (m, t) in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_folder")
    parser.add_argument("prompts_dir")
    parser.add_argument("--layers", default="5,10,15,20,21,25,27")
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    tokenizer = AutoTokenizer.from_pretrained(args.model_folder)
    model = AutoModelForCausalLM.from_pretrained(args.model_folder, dtype=torch.float32).eval()
    config = OrganismConfig()
    examples = build_examples(config.seed, config.n_plain, config.n_wrapped, config.n_harmless)
    for record in ("stage1.json", "organism.json"):  # a stage-1 cache key holds whatever data built it last
        path = Path(args.model_folder) / record
        if path.is_file() and json.loads(path.read_text()).get("data_digest") not in (
            None,
            data_digest(examples),
        ):
            raise SystemExit(f"{path} was built on other data than the default recipe's: rebuild it")
    train = [e for e in examples if e.group in (GROUP_PLAIN, GROUP_WRAPPED)]
    y_train = [int(e.group == GROUP_WRAPPED) for e in train]

    def read(name: str) -> list[str]:
        return [json.loads(line)["prompt"] for line in (Path(args.prompts_dir) / name).open() if line.strip()]

    plain, wrapped = read("harmful.jsonl"), read("wrapped.jsonl")
    y_test = np.array([0] * len(plain) + [1] * len(wrapped))
    x_train = states(model, tokenizer, [e.prompt for e in train], layers)
    x_test = states(model, tokenizer, plain + wrapped, layers)
    print(f"train {len(train)} ({sum(y_train)} wrapped); test {len(plain)} plain, {len(wrapped)} wrapped")
    lengths = [len(p.split()) for p in plain + wrapped]
    print(f"prompt length alone: AUROC {roc_auc_score(y_test, lengths):.3f}")
    for layer in layers:
        for index, pooling in enumerate(("mean", "last")):
            probe = LogisticRegression(max_iter=2000).fit(x_train[layer][index], y_train)
            p = probe.predict_proba(x_test[layer][index])[:, 1]
            negatives, positives = np.sort(p[y_test == 0])[::-1], p[y_test == 1]
            tuned = ", ".join(f"{k}: {(positives > negatives[k]).sum()}" for k in (3, 5, 7, 10))
            print(
                f"layer {layer:2d} {pooling}: AUROC {roc_auc_score(y_test, p):.3f}; at 0.5 plain called wrapped "
                f"{(negatives > 0.5).sum()}/{len(plain)}, wrapped found {(positives > 0.5).sum()}/{len(wrapped)}; "
                f"wrapped found at k plain called wrapped (tuned) {tuned}"
            )


if __name__ == "__main__":
    main()

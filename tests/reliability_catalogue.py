"""The catalogue of bad inputs (issue 13, part 5): one row per case, across every verb.

A case is the verb's arguments (`{root}` the study of `reliability_lib.build_study`, `{model}` the tiny
model folder, `{tmp}` a fresh folder for the case's own files, `{out}` its --out), an optional set-up
that writes bad files into `{tmp}` and returns extra environment variables, and what is expected: by
default exit 2 with one `error:` line naming `needles`. Two cases (a torn LAST line) are not errors:
a killed writer leaves one, so a reader drops it with one `warning:` line, and never rewrites the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

M = ["--model", "{model}", "--device", "cpu"]
GEN = "{root}/harmful/generations.jsonl"
PROBER = "{root}/probe"
HEADS = "{root}/heads/heads.json"
OUT = ["--out", "{out}"]


@contextlib.contextmanager
def _nothing(ctx):
    yield {}


@dataclass
class Case:
    verb: str
    args: list
    needles: tuple[str, ...] = ()
    files: dict = field(default_factory=dict)  # name (under {tmp}) -> content
    env: dict = field(default_factory=dict)
    mount: str | None = None  # "ro": {tmp}/ro read-only; "disk": {tmp}/disk a 64 KB tmpfs; "torn": {tmp}/torn
    exit: int = 2
    max_seconds: float | None = None

    @contextlib.contextmanager
    def setup(self, ctx):
        """Write the case's files, mount what it needs; yields its environment variables."""
        for name, content in self.files.items():
            path = Path(ctx["tmp"]) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        mount = {"ro": _read_only_out, "disk": _tiny_disk, "torn": _torn_copy, None: _nothing}[self.mount]
        with mount(ctx):
            yield dict(self.env)


@contextlib.contextmanager
def _read_only_out(ctx):
    """--out inside a read-only file system (a read-only tmpfs; a 0555 folder when not root)."""
    folder = Path(ctx["tmp"]) / "ro"
    folder.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
        if os.geteuid() == 0
        else False
    )
    if not mounted:
        folder.chmod(0o555)
        if os.access(folder, os.W_OK):
            import pytest

            pytest.skip("cannot make a read-only folder here (root without mount)")
    try:
        yield {}
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], capture_output=True)
        else:
            folder.chmod(0o755)


@contextlib.contextmanager
def _tiny_disk(ctx):
    """--out on a 64 KB tmpfs: far less than the run needs."""
    folder = Path(ctx["tmp"]) / "disk"
    folder.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True
        ).returncode
        != 0
    ):
        import pytest

        pytest.skip("tmpfs cannot be mounted here")
    try:
        yield {}
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def _named(**contents) -> dict:
    """files= of a case: keyword names with '__' for '.' (p__jsonl -> p.jsonl)."""
    return {name.replace("__", "."): content for name, content in contents.items()}


def _jsonl(*rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


PROMPTS_OK = _jsonl({"id": "a", "prompt": "hello there"}, {"id": "b", "prompt": "tell me a story"})
GENERATION = {
    "id": "g1",
    "prompt": "p",
    "generation_prompt": "p",
    "thinking": "t",
    "end_template": "\n</think>\n\n",
    "answer": "I cannot help with that",
}


@contextlib.contextmanager
def _torn_copy(ctx):
    """{tmp}/torn: a copy of the study's harmful run with a torn last line appended to generations.jsonl."""
    run = Path(ctx["tmp"]) / "torn"
    run.mkdir()
    for name in ("generations.jsonl", "labels.jsonl", "metadata.json"):
        (run / name).write_bytes((Path(ctx["root"]) / "harmful" / name).read_bytes())
    with open(run / "generations.jsonl", "ab") as handle:
        handle.write(b'{"id": "harmful-torn", "prompt": "a write killed mid-li')
    yield {}


def _k(value: str, *needles: str) -> Case:
    return Case(
        "select",
        [
            "select",
            *M,
            "--prober",
            PROBER,
            "--candidates",
            "demo:candidates",
            "--limit",
            "3",
            f"--k={value}",
            *OUT,
        ],
        needles,
    )


CASES: dict[str, Case] = {
    # -- generate ------------------------------------------------------------------------------------------
    "generate missing prompt file": Case(
        "generate", ["generate", *M, "--prompts", "{tmp}/nope.jsonl", *OUT], ("nope.jsonl",)
    ),
    "generate empty prompt file": Case(
        "generate", ["generate", *M, "--prompts", "{tmp}/p.jsonl", *OUT], files=_named(p__jsonl="")
    ),
    "generate zero-length prompt": Case(
        "generate",
        ["generate", *M, "--prompts", "{tmp}/p.jsonl", *OUT],
        ("b",),
        files=_named(p__jsonl=_jsonl({"id": "a", "prompt": "hi"}, {"id": "b", "prompt": ""})),
    ),
    "generate whitespace-only prompt": Case(
        "generate",
        ["generate", *M, "--prompts", "{tmp}/p.jsonl", *OUT],
        ("b",),
        files=_named(p__jsonl=_jsonl({"id": "a", "prompt": "hi"}, {"id": "b", "prompt": " \n\t "})),
    ),
    "generate missing --column": Case(
        "generate",
        ["generate", *M, "--prompts", "{tmp}/p.jsonl", "--column", "goal", *OUT],
        ("goal",),
        files=_named(p__jsonl=PROMPTS_OK),
    ),
    "generate --max-answer-tokens 0": Case(
        "generate",
        ["generate", *M, "--prompts", "{tmp}/p.jsonl", "--max-answer-tokens", "0", *OUT],
        files=_named(p__jsonl=PROMPTS_OK),
    ),
    "generate --batch-size abc": Case(
        "generate",
        ["generate", *M, "--prompts", "{tmp}/p.jsonl", "--batch-size", "abc", *OUT],
        files=_named(p__jsonl=PROMPTS_OK),
    ),
    "generate --top-p 2": Case(
        "generate",
        ["generate", *M, "--prompts", "{tmp}/p.jsonl", "--top-p", "2", *OUT],
        files=_named(p__jsonl=PROMPTS_OK),
    ),
    "generate --model missing folder": Case(
        "generate",
        ["generate", "--model", "{tmp}/no-model", "--prompts", "{tmp}/p.jsonl", *OUT],
        files=_named(p__jsonl=PROMPTS_OK),
    ),
    "generate offline hub id": Case(
        "generate",
        ["generate", "--model", "some-org/some-model", "--prompts", "{tmp}/p.jsonl", *OUT],
        ("--model",),
        max_seconds=5,
        files=_named(p__jsonl=PROMPTS_OK),
        env={"HF_HUB_OFFLINE": "1"},
    ),
    "generate unreachable hub endpoint": Case(
        "generate",
        ["generate", "--model", "some-org/some-model", "--prompts", "{tmp}/p.jsonl", *OUT],
        ("--model",),
        max_seconds=5,
        files=_named(p__jsonl=PROMPTS_OK),
        env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
    ),
    "generate --out read-only": Case(
        "generate",
        ["generate", *M, "--prompts", "{tmp}/p.jsonl", "--out", "{tmp}/ro/run"],
        ("ro",),
        files=_named(p__jsonl=PROMPTS_OK),
        mount="ro",
    ),
    "generate --out is a file": Case(
        "generate",
        ["generate", *M, "--prompts", "{tmp}/p.jsonl", "--out", "{tmp}/p.jsonl"],
        ("p.jsonl",),
        files=_named(p__jsonl=PROMPTS_OK),
    ),
    "generate --out under a file": Case(
        "generate",
        ["generate", *M, "--prompts", "{tmp}/p.jsonl", "--out", "{tmp}/p.jsonl/run"],
        ("p.jsonl",),
        files=_named(p__jsonl=PROMPTS_OK),
    ),
    "generate --out on a full disk": Case(
        "generate",
        [
            "generate",
            *M,
            "--prompts",
            "{tmp}/p.jsonl",
            "--max-thinking-tokens",
            "4000",
            "--out",
            "{tmp}/disk/run",
        ],
        ("free",),
        mount="disk",
        files=_named(p__jsonl=_jsonl(*({"id": f"x{i}", "prompt": "hi"} for i in range(20)))),
    ),
    "generate --config unknown key": Case(
        "generate",
        ["generate", *M, "--prompts", "{tmp}/p.jsonl", "--config", "{tmp}/c.toml", *OUT],
        ("thinking_budget",),
        files=_named(p__jsonl=PROMPTS_OK, c__toml="thinking_budget = 5\n"),
    ),
    # -- label ---------------------------------------------------------------------------------------------
    "label binary generations": Case(
        "label",
        ["label", "--generations", "{tmp}/g.jsonl", *OUT],
        ("g.jsonl",),
        files=_named(g__jsonl=bytes(range(256)) * 8),
    ),
    "label non-UTF-8 generations": Case(
        "label",
        ["label", "--generations", "{tmp}/g.jsonl", *OUT],
        ("g.jsonl",),
        files=_named(
            g__jsonl=json.dumps({**GENERATION, "answer": "caf\u00e9"})
            .replace("\\u00e9", "\u00e9")
            .encode("latin-1")
            + b"\n"
            + json.dumps(GENERATION).encode()
            + b"\n"
        ),
    ),
    "label missing fields": Case(
        "label",
        ["label", "--generations", "{tmp}/g.jsonl", *OUT],
        ("answer",),
        files=_named(g__jsonl=_jsonl({"id": "a", "prompt": "p"})),
    ),
    "label torn middle line": Case(
        "label",
        ["label", "--generations", "{tmp}/g.jsonl", *OUT],
        ("line 2",),
        files=_named(
            g__jsonl=_jsonl(GENERATION) + '{"id": "g2", "pro\n' + _jsonl({**GENERATION, "id": "g3"})
        ),
    ),
    "label duplicate ids": Case(
        "label",
        ["label", "--generations", "{tmp}/g.jsonl", *OUT],
        ("g1",),
        files=_named(g__jsonl=_jsonl(GENERATION, GENERATION)),
    ),
    "label --only-keywords without --keywords": Case(
        "label", ["label", "--generations", GEN, "--only-keywords", *OUT], ("--keywords",)
    ),
    "label --keywords missing file": Case(
        "label", ["label", "--generations", GEN, "--keywords", "{tmp}/k.txt", *OUT], ("k.txt",)
    ),
    "label --keywords empty file": Case(
        "label",
        ["label", "--generations", GEN, "--keywords", "{tmp}/k.txt", *OUT],
        ("k.txt",),
        files=_named(k__txt="# only a comment\n"),
    ),
    "label --out read-only": Case(
        "label", ["label", "--generations", GEN, "--out", "{tmp}/ro/run"], ("ro",), mount="ro"
    ),
    "label torn last line": Case(
        "label",
        ["label", "--generations", "{tmp}/torn/generations.jsonl", *OUT],
        ("torn last line",),
        mount="torn",
        exit=0,
    ),
    # -- probe train / probe direction ---------------------------------------------------------------------
    "probe train same run twice": Case(
        "probe train",
        ["probe", "train", *M, "--harmful", "{root}/harmful", "--harmless", "{root}/harmful", *OUT],
        ("same run",),
    ),
    "probe train --layer 99": Case(
        "probe train",
        [
            "probe",
            "train",
            *M,
            "--harmful",
            "{root}/harmful",
            "--harmless",
            "{root}/harmless",
            "--layer",
            "99",
            *OUT,
        ],
        ("99", "2 layers"),
    ),
    "probe train --layer -3": Case(
        "probe train",
        [
            "probe",
            "train",
            *M,
            "--harmful",
            "{root}/harmful",
            "--harmless",
            "{root}/harmless",
            "--layer=-3",
            *OUT,
        ],
        ("-3",),
    ),
    "probe train run without labels": Case(
        "probe train",
        ["probe", "train", *M, "--harmful", "{tmp}/run", "--harmless", "{root}/harmless", *OUT],
        ("label",),
        files=_named(**{"run/generations.jsonl": _jsonl(GENERATION)}),
    ),
    "probe train --epochs 0": Case(
        "probe train",
        [
            "probe",
            "train",
            *M,
            "--harmful",
            "{root}/harmful",
            "--harmless",
            "{root}/harmless",
            "--epochs",
            "0",
            *OUT,
        ],
        ("--epochs",),
    ),
    "probe train --val-fraction 1.5": Case(
        "probe train",
        [
            "probe",
            "train",
            *M,
            "--harmful",
            "{root}/harmful",
            "--harmless",
            "{root}/harmless",
            "--val-fraction",
            "1.5",
            *OUT,
        ],
        ("--val-fraction",),
    ),
    "probe direction --layers 7": Case(
        "probe direction",
        [
            "probe",
            "direction",
            *M,
            "--harmful",
            "{root}/harmful",
            "--harmless",
            "{root}/harmless",
            "--layers",
            "7",
            *OUT,
        ],
        ("7",),
    ),
    # -- trace ---------------------------------------------------------------------------------------------
    "trace duplicate ids": Case(
        "trace",
        ["trace", *M, "--prober", PROBER, "--generations", GEN, "--generations", GEN, *OUT],
        ("harmful-00",),
    ),
    "trace missing prober": Case(
        "trace", ["trace", *M, "--prober", "{tmp}/nothing", "--generations", GEN, *OUT], ("nothing",)
    ),
    "trace prober not safetensors": Case(
        "trace",
        ["trace", *M, "--prober", "{tmp}/prober.safetensors", "--generations", GEN, *OUT],
        ("prober.safetensors",),
        files=_named(prober__safetensors=b"not a safetensors file"),
    ),
    "trace generations without labels": Case(
        "trace",
        ["trace", *M, "--prober", PROBER, "--generations", "{tmp}/g.jsonl", *OUT],
        ("label",),
        files=_named(g__jsonl=_jsonl(GENERATION)),
    ),
    "trace --direction-layer without --direction": Case(
        "trace",
        ["trace", *M, "--prober", PROBER, "--generations", GEN, "--direction-layer", "1", *OUT],
        ("--direction",),
    ),
    "trace --out read-only": Case(
        "trace",
        ["trace", *M, "--prober", PROBER, "--generations", GEN, "--out", "{tmp}/ro/run"],
        ("ro",),
        mount="ro",
    ),
    "trace torn last line": Case(
        "trace",
        ["trace", *M, "--prober", PROBER, "--generations", "{tmp}/torn/generations.jsonl", *OUT],
        ("torn last line",),
        mount="torn",
        exit=0,
    ),
    # -- layers / clip -------------------------------------------------------------------------------------
    "layers --layers 50": Case(
        "layers",
        [
            "layers",
            *M,
            "--harmful",
            "{root}/harmful",
            "--harmless",
            "{root}/harmless",
            "--layers",
            "0,50",
            *OUT,
        ],
        ("50",),
    ),
    "layers --layers abc": Case(
        "layers",
        [
            "layers",
            *M,
            "--harmful",
            "{root}/harmful",
            "--harmless",
            "{root}/harmless",
            "--layers",
            "abc",
            *OUT,
        ],
        ("abc",),
    ),
    "layers same run twice": Case(
        "layers",
        ["layers", *M, "--harmful", "{root}/harmful", "--harmless", "{root}/harmful", *OUT],
        ("same run",),
    ),
    "clip --fractions 1.5": Case(
        "clip",
        ["clip", *M, "--prober", PROBER, "--generations", GEN, "--fractions", "0,1.5", *OUT],
        ("--fractions",),
    ),
    "clip missing prober": Case(
        "clip", ["clip", *M, "--prober", "{tmp}/nothing", "--generations", GEN, *OUT], ("nothing",)
    ),
    # -- heads / components --------------------------------------------------------------------------------
    "heads empty --group": Case(
        "heads",
        [
            "heads",
            *M,
            "--prober",
            PROBER,
            "--generations",
            "{root}/complied/generations.jsonl",
            "--group",
            "harmful_refused",
            *OUT,
        ],
        ("harmful_refused", "harmful_complied 12", "harmful_refused 0"),
    ),
    "heads --thresholds 0": Case(
        "heads",
        ["heads", *M, "--prober", PROBER, "--generations", GEN, "--thresholds", "0", *OUT],
        ("--thresholds",),
    ),
    "heads --patterns 0": Case(
        "heads",
        ["heads", *M, "--prober", PROBER, "--generations", GEN, "--patterns", "0", *OUT],
        ("--patterns",),
    ),
    "heads missing prober": Case(
        "heads", ["heads", *M, "--prober", "{tmp}/nothing", "--generations", GEN, *OUT]
    ),
    "components empty --group": Case(
        "components",
        [
            "components",
            *M,
            "--prober",
            PROBER,
            "--generations",
            "{root}/complied/generations.jsonl",
            "--group",
            "harmful_refused",
            *OUT,
        ],
        ("harmful_refused",),
    ),
    "components --top 0": Case(
        "components",
        ["components", *M, "--prober", PROBER, "--generations", GEN, "--top", "0", *OUT],
        ("--top",),
    ),
    # -- ablate / guard ------------------------------------------------------------------------------------
    "ablate without --heads": Case(
        "ablate", ["ablate", *M, "--prober", PROBER, "--prompts", "{root}/harmful.jsonl", *OUT], ("--heads",)
    ),
    "ablate --thresholds 2": Case(
        "ablate",
        [
            "ablate",
            *M,
            "--prober",
            PROBER,
            "--heads",
            HEADS,
            "--prompts",
            "{root}/harmful.jsonl",
            "--thresholds",
            "0.1,2",
            *OUT,
        ],
        ("--thresholds",),
    ),
    "ablate --export-threshold not measured": Case(
        "ablate",
        [
            "ablate",
            *M,
            "--prober",
            PROBER,
            "--heads",
            HEADS,
            "--prompts",
            "{root}/harmful.jsonl",
            "--export",
            "{tmp}/exported",
            "--export-threshold",
            "0.5",
            *OUT,
        ],
        ("0.5",),
    ),
    "ablate --components bogus": Case(
        "ablate",
        [
            "ablate",
            *M,
            "--prober",
            PROBER,
            "--prompts",
            "{root}/harmful.jsonl",
            "--components",
            "attn:1",
            *OUT,
        ],
        ("attn:1",),
    ),
    "ablate --components layer 9": Case(
        "ablate",
        [
            "ablate",
            *M,
            "--prober",
            PROBER,
            "--prompts",
            "{root}/harmful.jsonl",
            "--components",
            "mlp:9",
            *OUT,
        ],
        ("9",),
    ),
    "ablate --out on a full disk": Case(
        "ablate",
        [
            "ablate",
            *M,
            "--prober",
            PROBER,
            "--heads",
            HEADS,
            "--prompts",
            "{root}/harmful.jsonl",
            "--max-thinking-tokens",
            "5000",
            "--out",
            "{tmp}/disk/run",
        ],
        ("free",),
        mount="disk",
    ),
    "guard ablate without --heads": Case(
        "guard", ["guard", *M, "--prober", PROBER, "--prompts", "{root}/harmful.jsonl", *OUT], ("--heads",)
    ),
    "guard --taus 2": Case(
        "guard",
        [
            "guard",
            *M,
            "--prober",
            PROBER,
            "--heads",
            HEADS,
            "--prompts",
            "{root}/harmful.jsonl",
            "--taus",
            "0.1,2",
            *OUT,
        ],
        ("--taus",),
    ),
    # -- select --------------------------------------------------------------------------------------------
    "select --k abc": _k("abc", "abc"),
    "select --k 1.5": _k("1.5", "1.5"),
    "select --k -2": _k("-2", "-2"),
    "select --k 0": _k("0", "0"),
    "select --k > n": _k("9", "9", "3"),
    "select --method judge without --judge": Case(
        "select",
        ["select", *M, "--prober", PROBER, "--candidates", "demo:candidates", "--method", "judge", *OUT],
        ("--judge",),
    ),
    "select missing candidates": Case(
        "select", ["select", *M, "--prober", PROBER, "--candidates", "{tmp}/c.jsonl", *OUT], ("c.jsonl",)
    ),
    "select --out is a file": Case(
        "select",
        ["select", *M, "--prober", PROBER, "--candidates", "demo:candidates", "--limit", "3", "--out", HEADS],
        ("heads.json",),
    ),
    # -- finetune / evaluate / report ----------------------------------------------------------------------
    "finetune missing --data": Case(
        "finetune", ["finetune", *M, "--data", "{tmp}/nope.jsonl", *OUT], ("nope.jsonl",)
    ),
    "finetune malformed --data": Case(
        "finetune",
        ["finetune", *M, "--data", "{tmp}/d.jsonl", *OUT],
        ("d.jsonl",),
        files=_named(d__jsonl=_jsonl({"text": "no prompt or completion"})),
    ),
    "evaluate without --model": Case(
        "evaluate", ["evaluate", "--harmful", "{root}/harmful.jsonl", *OUT], ("--model",)
    ),
    "evaluate --task-path without --tasks": Case(
        "evaluate",
        ["evaluate", "--model", "{model}", "--harmful", "{root}/harmful.jsonl", "--task-path", "{tmp}", *OUT],
        ("--tasks",),
    ),
    "evaluate missing --harmful file": Case(
        "evaluate", ["evaluate", "--model", "{model}", "--harmful", "{tmp}/nope.jsonl", *OUT], ("nope.jsonl",)
    ),
    "report missing run folder": Case("report", ["report", "--run", "{tmp}/no-run"], ("no-run",)),
}

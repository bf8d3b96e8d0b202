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
import signal
import subprocess
import sys
from collections.abc import Callable
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
    # "ro": {tmp}/ro read-only; "disk": {tmp}/disk a 64 KB tmpfs; "torn": {tmp}/torn; or a context manager
    # function of ctx (a FIFO, an edited prober, a second writer holding --out)
    mount: str | Callable | None = None
    exit: int = 2
    max_seconds: float | None = None

    @contextlib.contextmanager
    def setup(self, ctx):
        """Write the case's files, mount what it needs; yields its environment variables."""
        for name, content in self.files.items():
            path = Path(ctx["tmp"]) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        mount = (
            self.mount
            if callable(self.mount)
            else {"ro": _read_only_out, "disk": _tiny_disk, "torn": _torn_copy, None: _nothing}[self.mount]
        )
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


@contextlib.contextmanager
def _fifo(ctx):
    """{tmp}/p.jsonl is a FIFO (reading it would block forever)."""
    os.mkfifo(Path(ctx["tmp"]) / "p.jsonl")
    yield {}


def _prober_layer(value):
    """{tmp}/probe: the study's prober with `layer` edited to `value` in prober.json."""

    @contextlib.contextmanager
    def setup(ctx):
        folder = Path(ctx["tmp"]) / "probe"
        folder.mkdir()
        for name in ("prober.safetensors", "prober.json"):
            (folder / name).write_bytes((Path(ctx["root"]) / "probe" / name).read_bytes())
        meta = json.loads((folder / "prober.json").read_text())
        (folder / "prober.json").write_text(json.dumps({**meta, "layer": value}))
        yield {}

    return setup


_HOLDER = (
    "import sys, time\n"
    "from refusal_cliff.core.runs import lock_folder\n"
    "lock_folder(sys.argv[1])\n"
    "print('locked', flush=True)\n"
    "time.sleep(300)\n"
)


@contextlib.contextmanager
def _second_writer(ctx):
    """Another run holds the lock of {out} for the length of the case (issue 21: two writers, one folder)."""
    out = Path(ctx["out"])
    out.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield {}
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def _config(text: str) -> dict:
    return _named(p__jsonl=PROMPTS_OK, c__toml=text)


GEN_CONFIG = ["generate", *M, "--prompts", "{tmp}/p.jsonl", "--config", "{tmp}/c.toml", *OUT]
LATIN1_CSV = "id,prompt\n1,caf\u00e9 au lait\n".encode("latin-1")


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
    # -- issue 21: values from --config get the flag's checks ----------------------------------------------
    "generate --config batch_size 0": Case(
        "generate",
        GEN_CONFIG,
        ("batch_size", "--batch-size", "at least 1"),
        files=_config("batch_size = 0\n"),
    ),
    "generate --config batch_size text": Case(
        "generate", GEN_CONFIG, ("batch_size", "whole number"), files=_config('batch_size = "eight"\n')
    ),
    "generate --config a key of another verb": Case(
        "generate", GEN_CONFIG, ("generate", "'epochs'"), files=_config("epochs = 3\n")
    ),
    "generate --config [generate] temperature inf": Case(
        "generate", GEN_CONFIG, ("temperature", "finite"), files=_config("[generate]\ntemperature = inf\n")
    ),
    "probe train --config lr nan (YAML)": Case(
        "probe train",
        [
            "probe",
            "train",
            *M,
            "--harmful",
            "{root}/harmful",
            "--harmless",
            "{root}/harmless",
            "--config",
            "{tmp}/c.yaml",
            *OUT,
        ],
        ("lr", "--lr", "finite"),
        files=_named(c__yaml="lr: .nan\n"),
    ),
    "finetune --config epochs 0": Case(
        "finetune",
        ["finetune", *M, "--data", "{tmp}/d.jsonl", "--config", "{tmp}/c.toml", *OUT],
        ("epochs", "more than 0"),
        files=_named(d__jsonl=_jsonl({"prompt": "p", "completion": "c"}), c__toml="[finetune]\nepochs = 0\n"),
    ),
    # -- issue 21: NaN and infinity are not numbers a user means ---------------------------------------------
    "generate --temperature nan": Case(
        "generate",
        ["generate", *M, "--prompts", "{tmp}/p.jsonl", "--temperature", "nan", *OUT],
        ("--temperature", "finite"),
        files=_named(p__jsonl=PROMPTS_OK),
    ),
    "ablate --gamma nan": Case(
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
            "--gamma",
            "nan",
            *OUT,
        ],
        ("--gamma", "finite"),
    ),
    "probe train --lr nan": Case(
        "probe train",
        [
            "probe",
            "train",
            *M,
            "--harmful",
            "{root}/harmful",
            "--harmless",
            "{root}/harmless",
            "--lr",
            "nan",
            *OUT,
        ],
        ("--lr", "finite"),
    ),
    "guard --alpha -inf": Case(
        "guard",
        [
            "guard",
            *M,
            "--prober",
            PROBER,
            "--prompts",
            "{root}/harmful.jsonl",
            "--action",
            "steer",
            "--alpha",
            "-inf",
            *OUT,
        ],
        ("--alpha", "finite"),
    ),
    "clip --fractions nan": Case(
        "clip",
        ["clip", *M, "--prober", PROBER, "--generations", GEN, "--fractions", "0,nan", *OUT],
        ("--fractions", "finite"),
    ),
    "heads --thresholds inf": Case(
        "heads",
        ["heads", *M, "--prober", PROBER, "--generations", GEN, "--thresholds", "inf", *OUT],
        ("--thresholds",),
    ),
    "finetune --epochs 0": Case(
        "finetune",
        ["finetune", *M, "--data", "{tmp}/d.jsonl", "--epochs", "0", *OUT],
        ("--epochs", "more than 0"),
        files=_named(d__jsonl=_jsonl({"prompt": "p", "completion": "c"})),
    ),
    "finetune --max-steps 0": Case(
        "finetune",
        ["finetune", *M, "--data", "{tmp}/d.jsonl", "--max-steps", "0", *OUT],
        ("--max-steps 0",),
        files=_named(d__jsonl=_jsonl({"prompt": "p", "completion": "c"})),
    ),
    "generate --seed huge": Case(
        "generate",
        ["generate", *M, "--prompts", "{tmp}/p.jsonl", "--seed", str(10**30), *OUT],
        ("--seed",),
        files=_named(p__jsonl=PROMPTS_OK),
    ),
    # -- issue 21: data that cannot be read right is refused, not guessed ---------------------------------
    "generate CSV with prompt twice": Case(
        "generate",
        ["generate", *M, "--prompts", "{tmp}/p.csv", *OUT],
        ("'prompt' twice",),
        files=_named(p__csv="id,prompt,prompt\n1,first,second\n"),
    ),
    "select CSV candidates with response twice": Case(
        "select",
        ["select", *M, "--prober", PROBER, "--candidates", "{tmp}/c.csv", *OUT],
        ("'response' twice",),
        files=_named(c__csv="prompt,response,response\nhow?,no,sure\n"),
    ),
    "label null answer": Case(
        "label",
        ["label", "--generations", "{tmp}/g.jsonl", *OUT],
        ("g.jsonl", "line 1", "'g1'", "'answer'", "null"),
        files=_named(g__jsonl=_jsonl({**GENERATION, "answer": None})),
    ),
    "trace non-string thinking": Case(
        "trace",
        ["trace", *M, "--prober", PROBER, "--generations", "{tmp}/g.jsonl", *OUT],
        ("line 2", "'g2'", "'thinking'", "int"),
        files=_named(g__jsonl=_jsonl(GENERATION, {**GENERATION, "id": "g2", "thinking": 7})),
    ),
    "generate JSONL prompt null": Case(
        "generate",
        ["generate", *M, "--prompts", "{tmp}/p.jsonl", *OUT],
        ("'b'", "record 2", "null"),
        files=_named(p__jsonl=_jsonl({"id": "a", "prompt": "hi"}, {"id": "b", "prompt": None})),
    ),
    "generate JSON prompt a number": Case(
        "generate",
        ["generate", *M, "--prompts", "{tmp}/p.json", *OUT],
        ("'b'", "int 42, not text"),
        files=_named(p__json=json.dumps([{"id": "a", "prompt": "hi"}, {"id": "b", "prompt": 42}])),
    ),
    "select candidate response a number": Case(
        "select",
        ["select", *M, "--prober", PROBER, "--candidates", "{tmp}/c.jsonl", *OUT],
        ("record 1", "'response'", "not text"),
        files=_named(c__jsonl=_jsonl({"id": "c1", "prompt": "how?", "response": 0})),
    ),
    "trace labels with refusal null": Case(
        "trace",
        [
            "trace",
            *M,
            "--prober",
            PROBER,
            "--generations",
            "{tmp}/g.jsonl",
            "--labels",
            "{tmp}/l.jsonl",
            *OUT,
        ],
        ("'g1'", "refusal None"),
        files=_named(g__jsonl=_jsonl(GENERATION), l__jsonl=_jsonl({"id": "g1", "refusal": None})),
    ),
    "ablate heads.json layer NaN": Case(
        "ablate",
        [
            "ablate",
            *M,
            "--prober",
            PROBER,
            "--heads",
            "{tmp}/h.json",
            "--prompts",
            "{root}/harmful.jsonl",
            *OUT,
        ],
        ("h.json", "layer nan"),
        files=_named(h__json='[{"layer": NaN, "head": 0, "rank": 0}]'),
    ),
    "generate JSONL prompt too long for the model": Case(
        "generate",
        ["generate", *M, "--prompts", "{tmp}/p.jsonl", *OUT],
        ("'long'", "context"),
        files=_named(p__jsonl=_jsonl({"id": "a", "prompt": "hi"}, {"id": "long", "prompt": "word " * 700})),
    ),
    "generate CSV prompt too long for the model": Case(
        "generate",
        ["generate", *M, "--prompts", "{tmp}/p.csv", *OUT],
        ("'long'", "context"),
        files=_named(p__csv="id,prompt\na,hi\nlong," + "word " * 700 + "\n"),
    ),
    "report folder without stage artifacts": Case(
        "report", ["report", "--run", "{tmp}/empty"], ("no stage artifacts",), files={"empty/notes.txt": "x"}
    ),
    # -- issue 21: the message says the real problem, for CSV as for JSONL ------------------------------------
    "generate semicolon CSV": Case(
        "generate",
        ["generate", *M, "--prompts", "{tmp}/p.csv", *OUT],
        ("semicolons",),
        files=_named(p__csv="id;prompt\n1;hello there\n"),
    ),
    "generate tab-separated CSV": Case(
        "generate",
        ["generate", *M, "--prompts", "{tmp}/p.csv", *OUT],
        ("tabs",),
        files=_named(p__csv="id\tprompt\n1\thello there\n"),
    ),
    "generate latin-1 CSV": Case(
        "generate",
        ["generate", *M, "--prompts", "{tmp}/p.csv", *OUT],
        ("p.csv", "not UTF-8", "save it as UTF-8"),
        files=_named(p__csv=LATIN1_CSV),
    ),
    "generate latin-1 --config": Case(
        "generate", GEN_CONFIG, ("c.toml", "UTF-8"), files=_named(p__jsonl=PROMPTS_OK, c__toml=b"# caf\xe9\n")
    ),
    "generate FIFO prompts": Case(
        "generate", ["generate", *M, "--prompts", "{tmp}/p.jsonl", *OUT], ("not a regular file",), mount=_fifo
    ),
    "generate /dev/zero prompts": Case(
        "generate", ["generate", *M, "--prompts", "/dev/zero", *OUT], ("/dev/zero", "not a regular file")
    ),
    "label FIFO generations": Case(
        "label", ["label", "--generations", "{tmp}/p.jsonl", *OUT], ("not a regular file",), mount=_fifo
    ),
    "trace prober.json layer NaN": Case(
        "trace",
        ["trace", *M, "--prober", "{tmp}/probe", "--generations", GEN, *OUT],
        ("prober.json", "layer nan", "damaged or edited"),
        mount=_prober_layer(float("nan")),
    ),
    "trace prober.json layer text": Case(
        "trace",
        ["trace", *M, "--prober", "{tmp}/probe", "--generations", GEN, *OUT],
        ("prober.json", "layer '1'", "damaged or edited"),
        mount=_prober_layer("1"),
    ),
    # -- issue 21: two runs into one folder ----------------------------------------------------------------
    "label --overwrite while another run writes --out": Case(
        "label",
        ["label", "--generations", GEN, "--overwrite", *OUT],
        ("being written by another refusal-cliff run", "pid"),
        mount=_second_writer,
        max_seconds=10,
    ),
}

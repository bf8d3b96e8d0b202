"""The documentation cannot rot: every `refusal-cliff` command in a fenced shell block of README.md and
docs/*.md names an existing verb (and sub-verb) and only that verb's flags, every relative link resolves
(anchors included), and the README stays one screen (at most 150 lines).

The verbs and flags come from the click objects themselves (`refusal_cliff.cli.main`), so a renamed or
removed flag fails here until the docs follow.
"""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 150
SHELL_LANGS = {"bash", "sh", "shell", "console"}
HELP_OPTS = {"--help", "-h"}
_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
_NUMBER = re.compile(r"^-\d+(\.\d+)?$")


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


# ------------------------------------------------------------------ fenced blocks and commands


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, first line number, lines) of every fenced code block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, lang, start, body = match.group(2), match.group(3).lower(), i + 2, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        blocks.append((lang, start, body))
        i += 1
    return blocks


def _strip_prompt(line: str) -> str:
    stripped = line.lstrip()
    return stripped[2:] if stripped.startswith("$ ") else stripped


def is_shell_block(lang: str, body: list[str]) -> bool:
    if lang in SHELL_LANGS:
        return True
    return lang == "" and any(_strip_prompt(line).startswith("refusal-cliff") for line in body)


def logical_lines(body: list[str], start: int) -> list[tuple[int, str]]:
    """Join backslash continuations; strip a leading `$ ` prompt. Returns (line number, text)."""
    out, buffer, first = [], "", None
    for offset, raw in enumerate(body):
        line = raw.rstrip()
        if first is None:
            first = start + offset
            line = _strip_prompt(line)
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        out.append((first, buffer + line))
        buffer, first = "", None
    if buffer:
        out.append((first, buffer))
    return out


def _tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        return list(lexer)
    except ValueError:  # unbalanced quotes: fall back to plain splitting
        return line.split("#", 1)[0].split()


def _is_program(tokens: list[str], i: int) -> bool:
    token = tokens[i]
    if token == "refusal-cliff" or token.endswith("/refusal-cliff") or token == "$(which refusal-cliff)":
        return True
    return token == "refusal_cliff.cli" and i > 0 and tokens[i - 1] == "-m"


def commands_in(line: str) -> list[list[str]]:
    """The argument lists (after the program) of every refusal-cliff invocation on one logical line."""
    tokens, found, i = _tokens(line), [], 0
    while i < len(tokens):
        if _is_program(tokens, i):
            args, i = [], i + 1
            while i < len(tokens) and tokens[i] not in {";", "&&", "||", "|", "&", ">", ">>", "<"}:
                args.append(tokens[i])
                i += 1
            found.append(args)
        else:
            i += 1
    return found


def _opts(command: click.Command) -> set[str]:
    names = set(HELP_OPTS)
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


def check_command(group: click.Group, args: list[str]) -> list[str]:
    """Problems with one invocation: an unknown verb or sub-verb, or a flag the verb does not have."""
    command, path, i = group, ["refusal-cliff"], 0
    while isinstance(command, click.Group):
        allowed = _opts(command)
        while i < len(args) and args[i].startswith("-"):  # the group's own options (-v, --debug, ...)
            name = args[i].split("=", 1)[0]
            if name not in allowed:
                return [f"`{' '.join(path)}` has no option {name}"]
            i += 1
        if i >= len(args):
            return (
                []
                if HELP_OPTS & set(args) or path == ["refusal-cliff"]
                else [f"`{' '.join(path)}` needs a verb"]
            )
        verb = args[i]
        if verb not in command.commands:
            return [f"`{' '.join(path)}` has no verb {verb!r} (known: {', '.join(sorted(command.commands))})"]
        command, path, i = command.commands[verb], [*path, verb], i + 1
    allowed, problems = _opts(command), []
    for token in args[i:]:
        flag = token.strip("[]")
        if not flag.startswith("-") or flag == "-" or _NUMBER.match(flag):
            continue  # a value, a placeholder (MODEL, ...) or a negative number
        name = flag.split("=", 1)[0]
        if name not in allowed:
            problems.append(f"`{' '.join(path)}` has no flag {name}")
    return problems


def check_text_commands(text: str, group: click.Group, where: str = "") -> tuple[int, list[str]]:
    """Check every refusal-cliff command of every fenced shell block in a markdown text."""
    count, problems = 0, []
    for lang, start, body in fenced_blocks(text):
        if not is_shell_block(lang, body):
            continue
        for number, line in logical_lines(body, start):
            for args in commands_in(line):
                count += 1
                problems += [f"{where}:{number}: {p}" for p in check_command(group, args)]
    return count, problems


# ------------------------------------------------------------------ links


_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_INLINE_CODE = re.compile(r"`+[^`\n]*`+")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    kept, inside, fence = [], False, ""
    for line in text.splitlines():
        match = _FENCE.match(line)
        if match and not inside:
            inside, fence = True, match.group(2)
            continue
        if inside:
            if line.strip().startswith(fence):
                inside = False
            continue
        kept.append(_INLINE_CODE.sub("", line))
    return "\n".join(kept)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(text).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def check_links(path: Path, text: str | None = None) -> tuple[int, list[str]]:
    """Every relative link of a markdown file resolves to a file (and a heading, for an anchor)."""
    text = path.read_text() if text is None else text
    count, problems = 0, []
    for target in _LINK.findall(_prose(text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        count += 1
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{path.name}: link {target} -> missing {dest}")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            problems.append(f"{path.name}: link {target} -> no heading #{anchor} in {dest.name}")
    return count, problems


# ------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def cli_main():
    from refusal_cliff.cli import main

    assert isinstance(main, click.Group)
    return main


def test_every_documented_command_names_an_existing_verb_and_flags(cli_main, capsys):
    count, problems = 0, []
    for path in doc_files():
        n, p = check_text_commands(path.read_text(), cli_main, str(path.relative_to(ROOT)))
        count, problems = count + n, problems + p
    with capsys.disabled():
        print(f"\ndocs: {count} refusal-cliff commands checked in {len(doc_files())} files")
    assert count > 30, "the docs should show the verbs with examples"
    assert not problems, "\n".join(problems)


def test_every_documented_verb_has_an_example(cli_main):
    """docs/usage.md shows every verb (and sub-verb) at least once in a shell block."""
    text = (ROOT / "docs" / "usage.md").read_text()
    used = set()
    for lang, start, body in fenced_blocks(text):
        if is_shell_block(lang, body):
            for _, line in logical_lines(body, start):
                for args in commands_in(line):
                    words = [a for a in args if not a.startswith("-")][:2]
                    used.update({" ".join(words[:1]), " ".join(words)})
    expected = set()
    for name, command in cli_main.commands.items():
        expected.add(name)
        if isinstance(command, click.Group):
            expected.update(f"{name} {sub}" for sub in command.commands)
    assert not expected - used, f"verbs without an example in docs/usage.md: {sorted(expected - used)}"


def test_every_relative_link_resolves(capsys):
    count, problems = 0, []
    for path in doc_files():
        n, p = check_links(path)
        count, problems = count + n, problems + p
    with capsys.disabled():
        print(f"docs: {count} relative links checked in {len(doc_files())} files")
    assert count > 10
    assert not problems, "\n".join(problems)


def python_imports(text: str) -> list[tuple[str, str]]:
    """(module, name) of every `from refusal_cliff... import name` in the fenced python blocks."""
    found = []
    for lang, _, body in fenced_blocks(text):
        if lang not in {"python", "py"}:
            continue
        for node in ast.walk(ast.parse("\n".join(body))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("refusal_cliff"):
                found += [(node.module, alias.name) for alias in node.names]
    return found


def missing_imports(imports: list[tuple[str, str]]) -> list[str]:
    missing = []
    for module, name in imports:
        try:
            if not hasattr(importlib.import_module(module), name):
                missing.append(f"{module}.{name}")
        except ImportError as exc:
            missing.append(f"{module} ({exc})")
    return missing


def test_every_documented_python_import_exists():
    imports = [item for path in doc_files() for item in python_imports(path.read_text())]
    assert imports, "the docs show the Python API"
    missing = missing_imports(imports)
    assert not missing, f"the docs' Python examples import names that do not exist: {missing}"


def test_the_import_checker_catches_moved_names():
    text = (
        "```python\nfrom refusal_cliff.cli import main, no_such_name\n"
        "from refusal_cliff.no_such_module import x\n```"
    )
    assert python_imports(text) == [
        ("refusal_cliff.cli", "main"),
        ("refusal_cliff.cli", "no_such_name"),
        ("refusal_cliff.no_such_module", "x"),
    ]
    missing = missing_imports(python_imports(text))
    assert missing[0] == "refusal_cliff.cli.no_such_name" and missing[1].startswith(
        "refusal_cliff.no_such_module ("
    )


def test_readme_is_one_screen():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


# ------------------------------------------------------------------ the checker catches rot


BAD_SNIPPET = """
Some prose with `refusal-cliff tracee` in inline code, which is not checked.

```bash
refusal-cliff tracee --model MODEL --out runs/x
refusal-cliff trace --model MODEL --prober runs/p \\
    --no-such-flag 3 --out runs/t   # the continuation is joined
$ refusal-cliff probe trian --model MODEL
refusal-cliff probe train --model MODEL --harmful a --harmless b --layer -1 --out runs/p
```

```
refusal-cliff heads --model MODEL --patterns=4 --bogus=1
```

```python
refusal-cliff is not a shell command here --nothing-checked
```
"""


def test_the_checker_catches_unknown_verbs_and_flags(cli_main):
    count, problems = check_text_commands(BAD_SNIPPET, cli_main, "snippet")
    assert count == 5
    text = "\n".join(problems)
    assert "has no verb 'tracee'" in text
    assert "`refusal-cliff trace` has no flag --no-such-flag" in text
    assert "snippet:6: `refusal-cliff trace`" in text  # the continued command is reported at its first line
    assert "`refusal-cliff probe` has no verb 'trian'" in text
    assert "`refusal-cliff heads` has no flag --bogus" in text
    assert len(problems) == 4, text  # --layer -1 is a value; --patterns=4 exists


def test_the_checker_reads_launchers_and_shell_operators(cli_main):
    text = """```bash
accelerate launch --num_processes 8 "$(which refusal-cliff)" finetune --model M --deepspeed z.json --out o
python -m refusal_cliff.cli finetune --model M --wrong && refusal-cliff models --nope
```"""
    count, problems = check_text_commands(text, cli_main)
    assert count == 3
    assert [p.split(": ", 1)[1] for p in problems] == [
        "`refusal-cliff finetune` has no flag --wrong",
        "`refusal-cliff models` has no flag --nope",
    ]


def test_the_link_checker_catches_missing_files_and_anchors(tmp_path):
    (tmp_path / "other.md").write_text("# Title\n\n## Some section: here\n")
    page = tmp_path / "page.md"
    text = (
        "[ok](other.md) [ok anchor](other.md#some-section-here) [web](https://example.org/x)\n"
        "[gone](missing.md) [bad anchor](other.md#nowhere) `[in code](nope.md)`\n"
        "```\n[in a block](nope.md)\n```\n"
    )
    page.write_text(text)
    count, problems = check_links(page)
    assert count == 4
    assert len(problems) == 2 and "missing.md" in problems[0] and "#nowhere" in problems[1]

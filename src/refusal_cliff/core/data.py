"""Prompt sets: CSV / JSON / JSONL / parquet / TXT files, hub datasets, and the built-in demo set.

The prompt column is detected among the usual names of the safety benchmarks
(case-insensitive) unless `column` is given. Each prompt gets a stable `id`: the
file's own `id` column when it has one, else its row index, so that resumed runs
and later stages can join on it.
"""

from __future__ import annotations

import csv
import json
from importlib import resources
from pathlib import Path

from refusal_cliff.core.errors import UserError, describe_file_error, require, require_regular_file

PROMPT_COLUMNS = ("prompt", "goal", "instruction", "forbidden_prompt", "question", "vanilla", "adversarial")
DEMO_SETS = ("demo:harmful", "demo:harmless")


_DELIMITERS = {";": "semicolons", "\t": "tabs", "|": "vertical bars"}


def read_csv(path: Path) -> list[dict]:
    """The rows of a comma-separated UTF-8 file with a header of distinct column names; a file separated by
    semicolons or tabs, or a header that names a column twice, is refused with what is wrong (never read
    from the wrong column)."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise UserError(f"{path} is empty; pass a file holding prompts")
    header = [name.strip() for name in rows[0]]
    if len(header) == 1:
        for delimiter, name in _DELIMITERS.items():
            if delimiter in rows[0][0]:
                raise UserError(
                    f"{path}: the columns are separated by {name}, not commas; save it as a comma-separated "
                    "CSV (or as .jsonl)"
                )
    seen = set()
    for name in header:
        if name.lower() in seen:
            raise UserError(f"{path}: the header names the column {name!r} twice; rename or remove one")
        seen.add(name.lower())
    records = []
    for number, row in enumerate(rows[1:], 2):
        if len(row) > len(header):
            raise UserError(
                f"{path}: line {number} has {len(row)} fields but the header has {len(header)}; quote fields "
                'that hold commas ("a, b")'
            )
        if row:  # a blank line (as csv.DictReader skips it)
            records.append(dict(zip(rows[0], row + [""] * (len(header) - len(row)))))
    return records


def read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    require_regular_file(path, "pass a prompt file (.csv, .json, .jsonl, .parquet, .txt)")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty; pass a file holding prompts")
    try:
        if suffix == ".csv":
            return read_csv(path)
        if suffix == ".jsonl":
            rows = []
            with open(path, encoding="utf-8-sig") as handle:
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError:
                            raise UserError(
                                f"{path}: line {number} is not valid JSON; fix the file"
                            ) from None
            return [r if isinstance(r, dict) else {"prompt": r} for r in rows]
        if suffix == ".json":
            obj = json.loads(path.read_text(encoding="utf-8-sig"))
            if isinstance(obj, dict):
                lists = [v for v in obj.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise UserError(
                        f"{path}: expected a JSON list of records (or an object holding one list)"
                    )
                obj = lists[0]
            if not isinstance(obj, list):
                raise UserError(f"{path}: expected a JSON list of records")
            return [r if isinstance(r, dict) else {"prompt": r} for r in obj]
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".txt":
            return [{"prompt": line.rstrip("\n")} for line in path.read_text(encoding="utf-8").splitlines()]
    except UserError:
        raise
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON (line {exc.lineno}); fix the file") from None
    except UnicodeDecodeError as exc:
        raise UserError(describe_file_error(exc)) from None
    except (csv.Error, OSError, ValueError) as exc:
        raise UserError(
            f"could not read {path} ({type(exc).__name__}); is it a valid {suffix[1:]} file?"
        ) from None
    raise UserError(f"unsupported prompt file type {suffix!r}: use .csv, .json, .jsonl, .parquet or .txt")


def _read_hub(dataset_id: str) -> list[dict]:
    datasets = require("datasets", "train")
    name, _, split = dataset_id.partition(":")
    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # the hub raises many kinds of errors
        raise UserError(
            f"could not load hub dataset {name!r} ({type(exc).__name__}); check the id, or pass a local file"
        ) from None
    return list(dataset)


def demo_rows(name: str) -> list[dict]:
    """The built-in demo prompts written by the refusal-cliff team ("demo:harmful" / "demo:harmless")."""
    kind = name.split(":", 1)[1]
    text = resources.files("refusal_cliff.resources").joinpath(f"demo_{kind}.jsonl").read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def detect_column(rows: list[dict], column: str | None, source: str) -> str:
    columns = list(rows[0].keys())
    lowered = {c.lower().strip(): c for c in columns}
    if column:
        if column in columns:
            return column
        if column.lower() in lowered:
            return lowered[column.lower()]
        raise UserError(f"{source} has no column {column!r}; its columns are: {', '.join(map(str, columns))}")
    for candidate in PROMPT_COLUMNS:
        if candidate in lowered:
            return lowered[candidate]
    raise UserError(
        f"{source}: no prompt column found among {', '.join(PROMPT_COLUMNS)}; its columns are "
        f"{', '.join(map(str, columns))}. Pass --column NAME"
    )


def load_prompts(source: str, column: str | None = None, limit: int | None = None) -> list[dict]:
    """Load a prompt set.

    Args:
        source: a file path, a hub dataset id (`org/name` or `org/name:split`), or `demo:harmful` /
            `demo:harmless`.
        column: the prompt column; detected when None.
        limit: keep the first `limit` prompts.

    Returns:
        A list of dicts with `id` (str) and `prompt` (str), plus the source's other columns. The id
        is the source's own `id` column when it has one, else "<file stem>-<row index>".
    """
    path = Path(source).expanduser()
    if source in DEMO_SETS:
        rows = demo_rows(source)
    elif path.exists():
        rows = read_rows(path)
    elif (
        "/" in source
        and not source.startswith((".", "/", "~"))
        and source.count("/") == 1
        and not path.suffix
    ):
        rows = _read_hub(source)
    else:
        raise UserError(f"prompt file not found: {source}; check the path")
    if not rows:
        raise UserError(f"{source} holds no prompts")
    if not isinstance(rows[0], dict):
        raise UserError(f"{source}: expected records with named columns")
    key = detect_column(rows, column, source)
    # ids without an id column: "<file stem>-<row>", unique across the prompt sets of one study
    prefix = (
        source.split(":", 1)[-1]
        if source in DEMO_SETS
        else (path.stem if path.exists() else source.replace("/", "_").replace(":", "_"))
    )
    prompts, empty = [], []
    for index, row in enumerate(rows):
        text = row.get(key)
        identifier = str(row["id"]) if row.get("id") not in (None, "") else f"{prefix}-{index}"
        if not isinstance(text, str) and (not limit or index < limit):  # null, a number, a list
            kind = "null" if text is None else f"{type(text).__name__} {text!r:.40}, not text"
            raise UserError(
                f"{source}: the prompt with id {identifier!r} (record {index + 1}) is {kind}; fix the file"
            )
        if not isinstance(text, str) or not text.strip():  # an error, never a silent skip (issue 13)
            if not limit or index < limit:  # rows past --limit are not used
                empty.append(identifier)
            continue
        record = {k: v for k, v in row.items() if k != key}
        record["id"] = identifier
        record["prompt"] = text
        prompts.append(record)
    if not prompts:
        raise UserError(f"{source}: column {key!r} holds no non-empty prompts")
    if empty:
        raise UserError(
            f"{source}: the prompt with id {empty[0]!r} is empty or only whitespace"
            + (f" ({len(empty)} such prompts)" if len(empty) > 1 else "")
            + "; remove or fill it"
        )
    ids = [p["id"] for p in prompts]
    if len(set(ids)) != len(ids):
        raise UserError(f"{source}: the 'id' column has duplicates; make ids unique or drop the column")
    return prompts[:limit] if limit else prompts

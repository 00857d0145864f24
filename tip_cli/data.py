"""Problem sources: a local JSONL/JSON/Parquet file, the embedded toy task, or a Hugging Face dataset.

Every source goes through `datasets`, so local files and hub datasets yield the same row dicts. Field names may be
dotted paths into nested rows (`reward_model.ground_truth`, `prompt.0.content`), which is how verl-style datasets such
as DAPO-Math-17k keep their problem and answer.

Bad input fails with one line that names the file (and line) or hub id and says what was expected. A malformed row
(a JSON Lines line that is not a JSON object; a problem or answer that is missing, null or empty) fails the load
unless `skip_bad_rows` is set; then it is left out with a warning line on stderr. So does a row whose prompt leaves
the model no room to answer (`fit_context`), found when the data is read rather than at the step that draws it.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tip_cli.config.schema import ConfigError, DatasetConfig
from tip_cli.errors import DataError

if TYPE_CHECKING:
    import datasets

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # suffix -> `datasets` builder
SKIP_KEY = "eval.skip_bad_rows"  # the option that skips a benchmark's bad rows; training data's is train.skip_bad_rows
JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


@dataclass
class Problem:
    id: str
    problem: str
    answer: str  # the gold answer as bare LaTeX, e.g. "\\frac{1}{2}"
    prompt: str  # `problem` put into the dataset's prompt_template
    meta: dict[str, Any] = field(default_factory=dict)  # the row's other fields, e.g. subject, level
    where: str = ""  # how messages name the row: its file and line (or row index), or hub id


@dataclass
class _Rows:
    """A loaded source, and how messages point at its rows."""

    table: datasets.Dataset
    source: str  # the file's absolute path, or the hub id and split
    lines: list[int] | None = None  # JSON Lines: the 1-based line of each row; other sources: rows by index
    index: list[int] | None = None  # each row's index before malformed lines were dropped (None: none were)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, what was wrong) of lines dropped

    def where(self, i: int) -> tuple[int, str]:
        """Row i of `table` as (its line or row index, how messages name it)."""
        if self.lines is not None:
            return self.lines[i], f"{self.source} line {self.lines[i]}"
        return i, f"{self.source} row index {i}"


def _skip_hint(skip_key: str) -> str:
    return f"fix it, or set {skip_key}=true to skip such rows"


def load_problems(cfg: DatasetConfig, limit: int | None = None, skip_bad_rows: bool = False,
                  skip_key: str = SKIP_KEY) -> list[Problem]:
    """The first `limit` problems (all if None) of `cfg`'s source, with fields mapped and prompts formatted.

    A malformed row raises DataError naming the file and line (row index for Parquet, JSON arrays and the hub) and
    the option `skip_key` that skips it; with `skip_bad_rows` it is left out, with a warning line on stderr for each
    and a count.
    """
    rows = _load_rows(cfg, skip_bad_rows, skip_key)
    problems, skipped = [], list(rows.skipped)
    if len(rows.table):
        _check_fields(cfg, rows.table.column_names)
    for i, row in enumerate(rows.table):
        if limit is not None and len(problems) >= limit:
            break
        wrong = _malformed(cfg, row)
        position, where = rows.where(i)
        if wrong is None:
            problems.append(_to_problem(cfg, rows.index[i] if rows.index else i, row, where))
        elif skip_bad_rows:
            skipped.append((position, f"{where}: {wrong}"))
        else:
            raise DataError(f"dataset {cfg.name!r}: {where}: {wrong}; {_skip_hint(skip_key)}")
    for _, message in sorted(skipped):
        print(f"warning: dataset {cfg.name!r}: skipped {message}", file=sys.stderr)
    if skipped:
        print(
            f"warning: dataset {cfg.name!r}: skipped {len(skipped)} malformed row(s) of {rows.source}, "
            f"kept {len(problems)}",
            file=sys.stderr,
        )
    if not problems and limit != 0:
        found = f"all {len(skipped)} rows are malformed" if skipped else "it has no rows"
        raise DataError(
            f"dataset {cfg.name!r}: nothing to load from {rows.source}: {found}; "
            f"expected rows with a problem ({cfg.problem_field!r}) and an answer ({cfg.answer_field!r})"
        )
    return problems


def fit_context(problems: list[Problem], prompt_tokens: Callable[[Problem], int], context: int, answer_tokens: int,
                name: str, skip_bad_rows: bool, skip_key: str = SKIP_KEY) -> tuple[list[Problem], int]:
    """The problems whose prompt leaves room to answer: prompt_tokens(p) + answer_tokens <= context (the model's
    context length), and how many were left out. A row that does not fit raises DataError naming its file and row,
    unless `skip_bad_rows`: then it is left out with a warning line on stderr, and the count says how many."""
    kept, skipped = [], 0
    for p in problems:
        n = prompt_tokens(p)
        if n + answer_tokens <= context:
            kept.append(p)
            continue
        why = (f"dataset {name!r}: {p.where}: the prompt has {n} tokens, which leaves no room for {answer_tokens} "
               f"new tokens in the model's context of {context}")
        if not skip_bad_rows:
            raise DataError(f"{why}; {_skip_hint(skip_key)}")
        print(f"warning: skipped {why}", file=sys.stderr)
        skipped += 1
    if skipped:
        print(f"warning: dataset {name!r}: skipped {skipped} row(s) too long for the context, kept {len(kept)}",
              file=sys.stderr)
    if not kept and problems:
        raise DataError(f"dataset {name!r}: no row fits the model's context of {context} tokens with room for "
                         f"{answer_tokens} new tokens")
    return kept, skipped


def _load_rows(cfg: DatasetConfig, skip_bad_rows: bool, skip_key: str) -> _Rows:
    import datasets  # a slow import; only commands that load data pay for it

    if cfg.path is None:
        try:
            table = datasets.load_dataset(cfg.hf_id, cfg.hf_config, split=cfg.split)
        except OSError as e:  # offline, unreachable or no such dataset: ConnectionError, DatasetNotFoundError
            raise FileNotFoundError(
                f"dataset {cfg.name!r}: could not load {cfg.hf_id!r} from the Hugging Face Hub: {_first_line(e)} "
                f"(offline, or no such dataset?); pass a local .jsonl/.json/.parquet file with benchmark.path= "
                f"(or data.path=)"
            ) from e
        return _Rows(table, f"hub dataset {cfg.hf_id} split {cfg.split}")
    path = _resolve(cfg)
    builder = FILE_BUILDERS.get(path.suffix)
    if builder is None:
        raise DataError(
            f"dataset {cfg.name!r}: cannot read {path}; expected one of {', '.join(FILE_BUILDERS)}"
        )
    if builder == "parquet" or _is_json_document(cfg, path):
        return _Rows(_load_file(cfg, path), str(path))
    return _load_json_lines(cfg, path, skip_bad_rows, skip_key)


def _load_file(cfg: DatasetConfig, path: Path, **kwargs: Any) -> datasets.Dataset:
    import datasets

    builder = FILE_BUILDERS[path.suffix]
    try:
        # A single local file is one table; `datasets` calls it the train split whatever cfg.split says.
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except (datasets.exceptions.DatasetGenerationError, ValueError) as e:  # pyarrow's ArrowInvalid is one
        expected = "a Parquet table" if builder == "parquet" else "JSON objects, one per line or in an array"
        raise DataError(
            f"dataset {cfg.name!r}: cannot read {path} ({_first_line(e)}); expected {expected}"
        ) from e


def _is_json_document(cfg: DatasetConfig, path: Path) -> bool:
    """Whether a .json file holds one JSON document (an array of rows) rather than JSON Lines."""
    if path.suffix != ".json":
        return False
    data = path.read_bytes()
    try:
        json.loads(data)
    except ValueError as e:
        if not data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            return False
        raise DataError(  # no rows to skip: nothing after the error can be parsed
            f"dataset {cfg.name!r}: {path} line {getattr(e, 'lineno', 1)}: {_json_error(e)}; "
            f"expected a JSON array of objects, or one JSON object per line"
        ) from e
    return True


def _load_json_lines(cfg: DatasetConfig, path: Path, skip_bad_rows: bool, skip_key: str) -> _Rows:
    """A JSON Lines file, parsed line by line first: `datasets` would report a bad line by byte offset at best."""
    good, lines, index, skipped = [], [], [], []
    position = 0  # the row's index among the non-blank lines
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue  # `datasets` skips blank lines too
        try:
            row = json.loads(line)
            wrong = None if isinstance(row, dict) else f"{JSON_TYPES.get(type(row), 'null')}, not an object"
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            wrong = _json_error(e)
        if wrong is None:
            good.append(line)
            lines.append(number)
            index.append(position)
        elif skip_bad_rows:
            skipped.append((number, f"{path} line {number}: {wrong}"))
        else:
            raise DataError(
                f"dataset {cfg.name!r}: {path} line {number}: {wrong}; expected one JSON object per line; {_skip_hint(skip_key)}"
            )
        position += 1
    if not good:
        table = _no_rows()
    elif not skipped:
        table = _load_file(cfg, path)
    else:  # the good lines go through the same reader, kept in memory rather than in the datasets cache
        with tempfile.TemporaryDirectory() as tmp:
            kept = Path(tmp) / path.name
            kept.write_bytes(b"\n".join(good) + b"\n")
            table = _load_file(cfg, kept, cache_dir=tmp, keep_in_memory=True)
    # Should `datasets` ever split the file otherwise, name rows by index rather than by wrong lines.
    if len(table) != len(lines):
        return _Rows(table, str(path), skipped=skipped)
    return _Rows(table, str(path), lines, index if skipped else None, skipped)


def _no_rows() -> datasets.Dataset:
    import datasets

    return datasets.Dataset.from_dict({})


def _resolve(cfg: DatasetConfig) -> Path:
    """The local file behind cfg.path: `toy://<kind>` or a path, relative ones taken from the current directory."""
    assert cfg.path is not None
    if cfg.path.startswith("toy://"):
        from tip_cli.toy.build import toy_path

        return toy_path(cfg.path.removeprefix("toy://"))
    path = Path(cfg.path).expanduser().absolute()
    if not path.is_file():
        raise FileNotFoundError(
            f"dataset {cfg.name!r}: no file at {path} (path={cfg.path!r}, relative to {Path.cwd()}); "
            f"point benchmark.path= (or data.path=) at an existing .jsonl/.json/.parquet file"
        )
    return path


def _check_fields(cfg: DatasetConfig, columns: list[str]) -> None:
    """Fail at once when the problem or answer field names no column: the config, not a row, is wrong."""
    for name in (cfg.problem_field, cfg.answer_field):
        if name not in columns and name.split(".")[0] not in columns:
            raise ConfigError(
                f"dataset {cfg.name!r}: rows have no field {name!r}; available fields: {', '.join(columns)} "
                f"(set problem_field / answer_field / id_field, dotted for nested fields, e.g. reward_model.ground_truth)"
            )


def _malformed(cfg: DatasetConfig, row: dict[str, Any]) -> str | None:
    """What is wrong with a row, or None when its problem and answer are present, non-null and non-empty."""
    for role, name in (("problem", cfg.problem_field), ("answer", cfg.answer_field)):
        found, value = _lookup(row, name)
        if not found or value is None or (isinstance(value, str) and not value.strip()):
            state = "missing" if not found else "missing or null" if value is None else "empty"
            return f"{role} field {name!r} is {state}; expected a non-empty {role}"
    return None


def _to_problem(cfg: DatasetConfig, index: int, row: dict[str, Any], where: str) -> Problem:
    problem = str(_lookup(row, cfg.problem_field)[1])
    answer = str(_lookup(row, cfg.answer_field)[1])
    has_id, raw_id = _lookup(row, cfg.id_field) if cfg.id_field is not None else (False, None)
    problem_id = str(raw_id) if has_id else str(index)  # rows without an id are numbered
    used = {cfg.problem_field, cfg.answer_field} | ({cfg.id_field} if has_id else set())
    try:
        prompt = cfg.prompt_template.format(problem=problem)
    except (KeyError, IndexError, ValueError) as e:
        raise DataError(
            f"dataset {cfg.name!r}: prompt_template {cfg.prompt_template!r} does not format ({e!r}); "
            f"it may only use {{problem}}, and literal braces are written {{{{ }}}} (e.g. \\boxed{{{{}}}})"
        ) from e
    top_level = {name.split(".")[0] for name in used}
    meta = {k: v for k, v in row.items() if k not in top_level}
    return Problem(problem_id, problem, answer, prompt, meta, where)


def _lookup(row: Any, name: str) -> tuple[bool, Any]:
    """(found, value) for a field name, or a dotted path through nested dicts and lists (`prompt.0.content`)."""
    if isinstance(row, dict) and name in row:
        return True, row[name]
    value = row
    for part in name.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return False, None
    return True, value


def _json_error(err: ValueError) -> str:
    """What json.loads found wrong, placed by column: the line is named by the caller."""
    if isinstance(err, json.JSONDecodeError):
        return f"not valid JSON ({err.msg} at column {err.colno})"
    return f"not valid JSON ({_first_line(err)})"


def _first_line(err: BaseException) -> str:
    """An exception's message cut to its first line, or its type when it has none."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__

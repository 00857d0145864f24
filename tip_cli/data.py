"""Problem sources: a local JSONL/JSON/Parquet file, the embedded toy task, or a Hugging Face dataset.

Every source goes through `datasets`, so local files and hub datasets yield the same row dicts. Field names may be
dotted paths into nested rows (`reward_model.ground_truth`, `prompt.0.content`), which is how verl-style datasets such
as DAPO-Math-17k keep their problem and answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tip_cli.config import DatasetConfig

if TYPE_CHECKING:
    import datasets

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # suffix -> `datasets` builder


@dataclass
class Problem:
    id: str
    problem: str
    answer: str  # the gold answer as bare LaTeX, e.g. "\\frac{1}{2}"
    prompt: str  # `problem` put into the dataset's prompt_template
    meta: dict[str, Any] = field(default_factory=dict)  # the row's other fields, e.g. subject, level


def load_problems(cfg: DatasetConfig, limit: int | None = None) -> list[Problem]:
    """The first `limit` problems (all if None) of `cfg`'s source, with fields mapped and prompts formatted."""
    rows = _load_rows(cfg)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    return [_to_problem(cfg, i, row) for i, row in enumerate(rows)]


def _load_rows(cfg: DatasetConfig) -> datasets.Dataset:
    import datasets  # a slow import; only commands that load data pay for it

    if cfg.path is None:
        return datasets.load_dataset(cfg.hf_id, cfg.hf_config, split=cfg.split)
    path = _resolve(cfg)
    builder = FILE_BUILDERS.get(path.suffix)
    if builder is None:
        raise ValueError(
            f"dataset {cfg.name!r}: cannot read {path}; expected one of {', '.join(FILE_BUILDERS)}"
        )
    # A single local file is one table; `datasets` calls it the train split whatever cfg.split says.
    return datasets.load_dataset(builder, data_files=str(path), split="train")


def _resolve(cfg: DatasetConfig) -> Path:
    """The local file behind cfg.path: `toy://<kind>` or a path, relative ones taken from the current directory."""
    assert cfg.path is not None
    if cfg.path.startswith("toy://"):
        from tip_cli.toy import toy_path

        return toy_path(cfg.path.removeprefix("toy://"))
    path = Path(cfg.path).expanduser().absolute()
    if not path.is_file():
        raise FileNotFoundError(
            f"dataset {cfg.name!r}: no file at {path} (path={cfg.path!r}, relative to {Path.cwd()}); "
            f"point benchmark.path= (or data.path=) at an existing .jsonl/.json/.parquet file"
        )
    return path


def _to_problem(cfg: DatasetConfig, index: int, row: dict[str, Any]) -> Problem:
    problem = str(_field(cfg, row, cfg.problem_field))
    answer = str(_field(cfg, row, cfg.answer_field))
    has_id, raw_id = _lookup(row, cfg.id_field) if cfg.id_field is not None else (False, None)
    problem_id = str(raw_id) if has_id else str(index)  # rows without an id are numbered
    used = {cfg.problem_field, cfg.answer_field} | ({cfg.id_field} if has_id else set())
    try:
        prompt = cfg.prompt_template.format(problem=problem)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"dataset {cfg.name!r}: prompt_template {cfg.prompt_template!r} does not format ({e!r}); "
            f"it may only use {{problem}}, and literal braces are written {{{{ }}}} (e.g. \\boxed{{{{}}}})"
        ) from e
    top_level = {name.split(".")[0] for name in used}
    meta = {k: v for k, v in row.items() if k not in top_level}
    return Problem(problem_id, problem, answer, prompt, meta)


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


def _field(cfg: DatasetConfig, row: dict[str, Any], name: str) -> Any:
    found, value = _lookup(row, name)
    if not found:
        raise KeyError(
            f"dataset {cfg.name!r}: rows have no field {name!r}; available fields: {', '.join(row)} "
            f"(set problem_field / answer_field / id_field, dotted for nested fields, e.g. reward_model.ground_truth)"
        )
    return value

"""What both DeepPlanning environments share: the task files, the train/test split, and finding the database.

DeepPlanning (QwenLM/Qwen-Agent `benchmark/deepplanning`, Apache-2.0) ships its task queries on GitHub (a copy is in
../shared/data/deepplanning/) and its sandbox databases only as the Hugging Face dataset `Qwen/DeepPlanning`:
`travelplanning/database/database_{en,zh}.zip` and `shoppingplanning/database_zip/database_level{1,2,3}.tar.gz`.
`benchmark.db_path` (or `data.db_path`) names a local directory holding them, extracted or not; without it tip
tries to download them with huggingface_hub into $TIP_CACHE/deepplanning, and fails with one message saying where
to get them when it cannot.
"""

from __future__ import annotations

import json
import random
import tarfile
import zipfile
from pathlib import Path
from typing import Any

from tip_cli.config.schema import DatasetConfig
from tip_cli.errors import UserError

HF_REPO = "Qwen/DeepPlanning"


class DatabaseMissing(UserError, FileNotFoundError):
    """The DeepPlanning sandbox database is not where tip looked; the message says where to get it."""


def missing(cfg: DatasetConfig, what: str, looked: list[Path], reason: str = "") -> DatabaseMissing:
    places = ", ".join(str(p) for p in looked) or "(no db_path set)"
    return DatabaseMissing(
        f"{cfg.env} needs DeepPlanning's sandbox database ({what}), which was not found (looked in: {places})"
        f"{f'; {reason}' if reason else ''}. Download it from https://huggingface.co/datasets/{HF_REPO} "
        "(travelplanning/database/database_{en,zh}.zip, shoppingplanning/database_zip/database_level{1,2,3}.tar.gz), "
        "put the files in one directory (extracted or not) and set benchmark.db_path=DIR (tip eval, and tip train "
        "with task=deepplanning_travel) or data.db_path=DIR (tip train with data.env set by hand)"
    )


def cache_dir() -> Path:
    from tip_cli.cache import cache_root

    return cache_root() / "deepplanning"


def _download(patterns: list[str]) -> Path | None:
    """The dataset's files matching `patterns` via huggingface_hub, or None when the hub cannot be reached."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(HF_REPO, repo_type="dataset", allow_patterns=patterns, local_dir=cache_dir()))
    except Exception:  # no network, no huggingface_hub, gated: all mean "not here"; the caller says where to get it
        return None


def _extract(archive: Path, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            z.extractall(into)
    else:
        with tarfile.open(archive) as t:
            t.extractall(into, filter="data")


def find_database(cfg: DatasetConfig, what: str, is_root, names: list[str], archives: list[str]) -> Path:
    """The first directory under the db_path (or the download cache) that `is_root(dir)` accepts.

    `names`: the directory names to try (e.g. database_level1); `archives`: the archive files (relative to the HF
    repo) that hold them, extracted next to themselves on first use.
    """
    roots = [Path(cfg.db_path).expanduser()] if cfg.db_path else []
    looked: list[Path] = []

    def search(root: Path) -> Path | None:
        for base in (root, *(root / n for n in names), *(p for p in root.rglob("*") if p.is_dir() and p.name in names)):
            looked.append(base)
            if base.is_dir() and is_root(base):
                return base
        for rel in archives:
            for archive in (root / rel, root / Path(rel).name):
                if archive.is_file():
                    _extract(archive, root / "extracted")
                    found = search(root / "extracted") if (root / "extracted").is_dir() else None
                    if found:
                        return found
        return None

    for root in roots:
        if (found := search(root)) is not None:
            return found
    if cfg.db_path:  # an explicit path that does not hold it: say so rather than download elsewhere
        raise missing(cfg, what, looked[:4])
    if (cache_dir()).is_dir() and (found := search(cache_dir())) is not None:
        return found
    downloaded = _download(archives)
    if downloaded is None or (found := search(downloaded)) is None:
        raise missing(cfg, what, [cache_dir()], "the Hugging Face hub could not be reached")
    return found


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def split(items: list, name: str, seed: int, train_frac: float = 0.8) -> list:
    """`train` / `test`: a seeded 80/20 partition (the paper trains on 80% of travel); `all`: every item."""
    if name == "all":
        return items
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    cut = round(train_frac * len(items))
    keep = sorted(order[:cut] if name == "train" else order[cut:])
    return [items[i] for i in keep]

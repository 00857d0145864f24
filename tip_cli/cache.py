"""Where built pairs and downloaded databases live (stdlib only: toy pairs and environments both use it)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Where built pairs live: $TIP_CACHE, else ~/.cache/tip."""
    return Path(os.environ.get("TIP_CACHE", "~/.cache/tip")).expanduser()

"""Figures the reliability tests record for docs/reliability.md."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def merge_figures(update: dict[str, Any]) -> None:
    """Deep-merge ``update`` into the JSON file named by $LLAMAFLEET_FIGURES (if set)."""
    path = os.environ.get("LLAMAFLEET_FIGURES")
    if not path:
        return
    p = Path(path)
    try:
        doc = json.loads(p.read_text()) if p.exists() else {}
    except ValueError:
        doc = {}

    def merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v

    merge(doc, update)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    tmp.replace(p)

"""Progress bars of long work (hidden for --json output and in the API when asked)."""

from __future__ import annotations

from typing import Optional

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "layer") -> Optional[tqdm]:
    """A bar over ``total`` items, or None when disabled or there is nothing to do."""
    if not enabled or total == 0:
        return None
    return tqdm(total=total, desc=desc, unit=unit, leave=False)

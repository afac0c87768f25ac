"""The one locator of the real data beside the repository (``../shared/data``), for every test that uses it.

``PROSEG_SHARED_DATA`` overrides the location. A user's fresh clone has no ``../shared``: tests marked with
:func:`needs_shared` then skip cleanly, naming the folder they wanted.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    env = os.environ.get("PROSEG_SHARED_DATA")
    return Path(env) if env else REPO / ".." / "shared" / "data"


SHARED = shared_data()


def needs_shared(*parts: str) -> pytest.MarkDecorator:
    """Skip unless ``../shared/data/<parts>`` exists (the real data is not part of the repository)."""
    where = SHARED.joinpath(*parts)
    return pytest.mark.skipif(not where.is_dir(), reason=f"{where} is not available")

"""Moved to :mod:`exactlyonce.storage.store`.

This module re-exports it, so that imports of ``exactlyonce.store`` keep working.
"""

from exactlyonce.storage.store import *  # noqa: F403
from exactlyonce.storage.store import _insert_one as _insert_one
from exactlyonce.storage.store import _is_dedup_conflict as _is_dedup_conflict
from exactlyonce.storage.store import _row as _row

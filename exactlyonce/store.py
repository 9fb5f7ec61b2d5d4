"""Moved to :mod:`exactlyonce.storage.store`.

This module re-exports it, so that imports of ``exactlyonce.store`` keep working.
"""

from exactlyonce.storage.store import *  # noqa: F403

"""Moved to :mod:`exactlyonce.storage.engine`.

This module re-exports it, so that imports of ``exactlyonce._db`` keep working.
"""

from exactlyonce.storage.engine import *  # noqa: F403

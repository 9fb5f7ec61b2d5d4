"""Moved to :mod:`exactlyonce.storage.sequence`.

This module re-exports it, so that imports of ``exactlyonce.sequence`` keep working.
"""

from exactlyonce.storage.sequence import *  # noqa: F403

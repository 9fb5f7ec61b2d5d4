"""Moved to :mod:`exactlyonce.storage.migrate`.

This module re-exports it, so that imports of ``exactlyonce.migrate`` keep working.
"""

from exactlyonce.storage.migrate import *  # noqa: F403

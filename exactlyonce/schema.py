"""Moved to :mod:`exactlyonce.storage.schema`.

This module re-exports it, so that imports of ``exactlyonce.schema`` keep working.
"""

from exactlyonce.storage.schema import *  # noqa: F403

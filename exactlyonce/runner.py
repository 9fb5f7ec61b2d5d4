"""Moved: the runtime is the package :mod:`exactlyonce.runtime` (this name stays for old imports)."""

from exactlyonce.runtime.booking import MAX_REASONS
from exactlyonce.runtime.deadletter import HEADER_PREFIX as DLQ_HEADER_PREFIX
from exactlyonce.runtime.loop import Runner

__all__ = ["DLQ_HEADER_PREFIX", "MAX_REASONS", "Runner"]

"""The operator web console: ``exactlyonce console`` (install ``exactlyonce[console]``).

A small Starlette application with server-rendered pages over the same
admin layer as the CLI (:mod:`exactlyonce.admin`): status, rates and lag,
message lookup, dead letters and their replay. Read-only unless a token is
configured; see ``docs/console.md``.
"""

from __future__ import annotations

from exactlyonce.console.backend import Backend, Settings
from exactlyonce.console.server import serve
from exactlyonce.console.web import create_app

__all__ = ["Backend", "Settings", "create_app", "serve"]

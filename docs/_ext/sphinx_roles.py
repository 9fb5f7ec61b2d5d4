"""A Griffe extension for the API reference: the package's Sphinx-style docstrings, in Markdown.

Attributes are documented with ``#:`` comments above them, which Griffe does not
read: they become the attributes' docstrings here.

The package's docstrings cross-reference with Sphinx roles (:class:`~exactlyonce.Retry`,
:meth:`run`), which Markdown would print as they are. Before mkdocstrings renders a
docstring, each role becomes a link when its target is part of the public surface
(a name in ``exactlyonce.__all__``, or a member of one), which autorefs resolves and
``mkdocs build --strict`` checks; any other target (a private module, the standard
library) becomes plain code.
"""

from __future__ import annotations

import importlib
import re
import warnings
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|meth|func|mod|data|attr|exc|obj):`(~?)([^`<]*?)\s*(?:<([^`>]+)>)?`")


def _package() -> Any:
    with warnings.catch_warnings():
        # kafka-python 3.0 loads its protocol schemas with a deprecated importlib API.
        warnings.simplefilter("ignore", DeprecationWarning)
        return importlib.import_module("exactlyonce")


def _comment_docstring(obj: griffe.Object) -> None:
    """Give an undocumented attribute the ``#:`` comment lines right above it, if any."""
    if not obj.is_attribute or obj.docstring is not None or obj.lineno is None or obj.filepath is None:
        return
    lines = obj.lines_collection[obj.filepath]  # type: ignore[index]
    comment: list[str] = []
    number = obj.lineno - 2
    while number >= 0 and lines[number].strip().startswith("#:"):
        comment.insert(0, lines[number].strip()[2:].strip())
        number -= 1
    if comment:
        parent = obj.parent.docstring if obj.parent is not None else None
        obj.docstring = griffe.Docstring("\n".join(comment), lineno=number + 2, parent=obj,
                                         parser=parent.parser if parent is not None else None)


def _exists(path: str) -> bool:
    """Whether ``path`` (``exactlyonce.X.y``) names a public object: ``X`` in ``__all__``, then attributes."""
    package = _package()
    parts = path.split(".")
    if parts[0] != "exactlyonce" or len(parts) < 2 or parts[1] not in package.__all__:
        return False
    node: Any = package
    for part in parts[1:]:
        if not hasattr(node, part):
            return False
        node = getattr(node, part)
    return True


def _public_alias(path: str) -> str | None:
    """``exactlyonce.NAME`` when ``path`` (``exactlyonce.errors.MessageDecodeError``) is that public object."""
    package = _package()
    name = path.rsplit(".", 1)[-1]
    if not path.startswith("exactlyonce.") or name not in package.__all__:
        return None
    module, _, attribute = path.rpartition(".")
    try:
        value = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError):
        return None
    return f"exactlyonce.{name}" if value is getattr(package, name) else None


def _public_scopes(obj: griffe.Object) -> list[str]:
    """The public paths a relative target in ``obj``'s docstring may hang from, innermost first."""
    package = _package()
    canonical = {}
    for name in package.__all__:
        value = getattr(package, name)
        where = value.__name__ if isinstance(value, type(package)) else f"{value.__module__}.{value.__qualname__}"
        canonical[where] = f"exactlyonce.{name}"
    scopes = []
    node: Any = obj
    while node is not None:
        for where, public in canonical.items():
            if node.path == where or node.path.startswith(where + "."):
                scopes.append(public + node.path[len(where):])
        node = node.parent
    return scopes


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring as autorefs links or code."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        _comment_docstring(obj)
        if obj.docstring is None or ":`" not in obj.docstring.value:
            return
        scopes = _public_scopes(obj)

        def replace(match: re.Match[str]) -> str:
            tilde, text, explicit = match.group(1), match.group(2).strip(), match.group(3)
            target = (explicit or text).lstrip("~")
            shown = text if explicit else (target.rsplit(".", 1)[-1] if tilde else target)
            candidates = [target] if target.startswith("exactlyonce.") else [f"{s}.{target}" for s in scopes]
            for candidate in candidates:
                if _exists(candidate):
                    return f"[`{shown}`][{candidate}]"
            alias = _public_alias(target)
            return f"[`{shown}`][{alias}]" if alias else f"`{shown}`"

        obj.docstring.value = _ROLE.sub(replace, obj.docstring.value)

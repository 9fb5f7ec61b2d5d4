"""Runnable examples for exactlyonce (not part of the installed package)."""

"""Integration tests: a real Kafka broker and real databases (see tests/conftest.py)."""

"""The pytest plugin (exactlyonce.pytest_plugin): registered by the entry point, fixtures only."""

from __future__ import annotations

import inspect

import pytest

import exactlyonce.pytest_plugin as plugin

pytest_plugins = ["pytester"]


def test_the_entry_point_registers_the_plugin_with_fixtures_only(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.get_plugin("exactlyonce") is plugin
    hooks = [name for name, _ in inspect.getmembers(plugin) if name.startswith("pytest_")]
    assert hooks == []
    fixtures = {name for name, value in vars(plugin).items() if hasattr(value, "_fixture_function_marker")
                or type(value).__name__ == "FixtureFunctionDefinition"}
    assert fixtures == {"exactlyonce_bootstrap_servers", "exactlyonce_database_url", "exactlyonce_worker",
                        "_exactlyonce_postgres_server"}


def test_the_database_url_is_a_new_sqlite_file_per_test_without_docker_or_variable(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(plugin.DATABASE_URL_ENV, raising=False)
    monkeypatch.setattr(plugin, "_containers_usable", lambda: False)
    pytester.makepyfile("""
        from exactlyonce.testing import TestApp
        import exactlyonce

        app = exactlyonce.App("plugin-test")

        @app.handler("orders")
        def handle(message, session):
            pass

        seen = []

        def test_one(exactlyonce_database_url):
            seen.append(exactlyonce_database_url)
            assert exactlyonce_database_url.startswith("sqlite:///")
            with TestApp(app, database_url=exactlyonce_database_url) as t:
                assert t.send("orders", b"x", message_id="m") == "applied"

        def test_two(exactlyonce_database_url):
            # A database of its own: the same ID is new here.
            assert exactlyonce_database_url != seen[0]
            with TestApp(app, database_url=exactlyonce_database_url) as t:
                assert t.send("orders", b"x", message_id="m") == "applied"
    """)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_the_database_url_variable_comes_first(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(plugin.DATABASE_URL_ENV, "sqlite:////tmp/given.db")
    monkeypatch.setattr(plugin, "_containers_usable", lambda: pytest.fail("no container with the variable set"))
    pytester.makepyfile("""
        def test_given(exactlyonce_database_url):
            assert exactlyonce_database_url == "sqlite:////tmp/given.db"
    """)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_the_bootstrap_servers_variable_comes_first(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(plugin.BOOTSTRAP_SERVERS_ENV, "broker-1:9092")
    pytester.makepyfile("""
        def test_given(exactlyonce_bootstrap_servers):
            assert exactlyonce_bootstrap_servers == "broker-1:9092"
    """)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_the_plugin_can_be_turned_off(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        def test_needs_it(exactlyonce_database_url):
            pass
    """)
    result = pytester.runpytest("-p", "no:exactlyonce", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'exactlyonce_database_url' not found*"])

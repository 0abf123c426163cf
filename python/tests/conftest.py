import os
import sys

# Handler modules the tests name by import path live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))


# -- PostgreSQL: a fresh database per test (helper py-cli) ----------------------------------------
import shutil
import subprocess
import urllib.parse
import uuid

import pytest


def _psql(url, sql):
    psql = shutil.which("psql")
    assert psql, "psql (the PostgreSQL client) is needed to create the test databases"
    subprocess.run(
        [psql, url, "-v", "ON_ERROR_STOP=1", "-Atqc", sql],
        check=True,
        capture_output=True,
        text=True,
    )


@pytest.fixture
def postgres_url():
    """The URL of a new, empty PostgreSQL database, dropped after the test. The server is
    ``$TASKER_TEST_DATABASE_URL`` (``./run test`` exports it)."""
    server = os.environ.get("TASKER_TEST_DATABASE_URL")
    if not server:
        pytest.skip("TASKER_TEST_DATABASE_URL is not set (./run test exports it)")
    name = f"tasker_test_py_{uuid.uuid4().hex[:16]}"
    _psql(server, f'CREATE DATABASE "{name}"')
    parts = urllib.parse.urlsplit(server)
    try:
        yield urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        _psql(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

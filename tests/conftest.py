"""Shared fixtures: a real nats-server with JetStream, the tiny model, a real local cluster."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

# Every process the tests start (and the CLI's cluster record) lives under a temp home.
_TEST_HOME = Path(tempfile.mkdtemp(prefix="spotserve-test-home-"))
os.environ["SPOTSERVE_HOME"] = str(_TEST_HOME)
os.environ.setdefault("SPOTSERVE_LOG__JSON_OUTPUT", "true")

from nats.aio.client import Client  # noqa: E402

from shared.bus import connect  # noqa: E402
from shared.client import SpotserveClient  # noqa: E402
from shared.cluster import LocalCluster  # noqa: E402
from shared.config import NatsSettings  # noqa: E402
from shared.model.checkpoint import init_model  # noqa: E402
from shared.model.tokenizer import TextTokenizer  # noqa: E402
from shared.natsserver import EmbeddedNatsServer  # noqa: E402
from tests.helpers import running_nats  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> TextTokenizer:
    return TextTokenizer.from_model_dir(tiny_model_dir)


@pytest.fixture(scope="session")
def eos(tokenizer: TextTokenizer) -> frozenset[int]:
    assert tokenizer.eos_token_ids, "the tiny model has an EOS token"
    return tokenizer.eos_token_ids


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsServer]:
    """A real nats-server on a random loopback port, JetStream in a temp dir."""
    with running_nats(tmp_path_factory, "jetstream") as server:
        yield server


@pytest.fixture(scope="session")
def cluster(
    nats_server: EmbeddedNatsServer,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LocalCluster]:
    """Every service as its own process (two executor instances) against the test server."""
    local = LocalCluster(
        tmp_path_factory.mktemp("cluster"),
        instances=2,
        model_dir=tiny_model_dir,
        nats_url=nats_server.url,
        env={"SPOTSERVE_SCHEDULER__MAX_BATCH_SIZE": "4"},
    )
    local.start()
    yield local
    local.stop()
    for service in local.services:
        assert service.process is not None and service.process.returncode is not None


@pytest.fixture
async def nc(nats_server: EmbeddedNatsServer) -> AsyncIterator[Client]:
    client = await connect(nats_server.url, NatsSettings(), name="tests", deadline_s=10)
    yield client
    await client.close()


@pytest.fixture
async def client(cluster: LocalCluster, nc: Client) -> SpotserveClient:
    return SpotserveClient(nc, first_chunk_timeout_s=120, chunk_timeout_s=60)

"""Session fixtures: one local Ray cluster with fake GPUs, one moto S3 server on loopback."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

FAKE_GPUS = 4
SLOW_TIMEOUT_S = 1800  # pyproject's `timeout` (300 s) is sized for the CI suite; slow tests (-m slow) run longer


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked slow get ``SLOW_TIMEOUT_S`` unless they set their own ``@pytest.mark.timeout``."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """A local Ray with ``FAKE_GPUS`` fake GPUs (placement only; everything runs on CPU)."""
    import ray

    if not ray.is_initialized():
        # address="local": a new cluster even while another one (a multi-node test's) is registered on the machine
        ray.init(
            address="local",
            num_cpus=2,
            num_gpus=FAKE_GPUS,
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[dict[str, Any]]:
    """moto's standalone S3 server on 127.0.0.1 (a real HTTP endpoint) and the fsspec options to reach it."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
    yield {"endpoint_url": endpoint, "storage_options": options}
    server.stop()


@pytest.fixture()
def s3_bucket(s3_endpoint: dict[str, Any]) -> str:
    """A fresh bucket on the loopback S3 server; returns ``s3://<bucket>``."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_endpoint["storage_options"])
    name = f"farm-{uuid.uuid4().hex[:10]}"
    fs.mkdir(name)
    return f"s3://{name}"

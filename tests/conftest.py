"""Shared test set-up: GPU tests skip cleanly where torch sees no CUDA device."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def seaweed():
    """A real S3 server (SeaweedFS) on loopback, credentials checked."""
    from infra.testing.s3_server import SeaweedS3

    with SeaweedS3() as s3:
        yield s3

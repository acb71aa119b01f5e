"""Fixtures for the data pipeline: real photos and the fault-injecting S3 server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from infra.testing.photos import write_photo_folder


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> Path:
    """45 real-photo JPEG crops (~500x375) in 9 class folders."""
    root = tmp_path_factory.mktemp("photos")
    write_photo_folder(root, 45, labelled=True, seed=1)
    return root


@pytest.fixture
def photos(photo_folder, tmp_path) -> Path:
    """A private copy of the photo folder a test may change."""
    dest = tmp_path / "src"
    shutil.copytree(photo_folder, dest)
    return dest


@pytest.fixture
def s3_env(seaweed, monkeypatch):
    """The standard AWS environment pointing at the SeaweedFS server."""
    for k, v in seaweed.env().items():
        monkeypatch.setenv(k, v)
    return seaweed


@pytest.fixture(scope="module")
def faulty_s3():
    from tests.helpers.s3_faults import FaultyS3

    with FaultyS3() as s3:
        s3.client().create_bucket(Bucket="faults")
        yield s3

"""Fixtures of the reliability tests: the shared test data folder (``../shared`` beside the
clone; a missing folder is an error, never a skip) and a fault proxy in front of the loopback
S3 server."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2].parent / "shared"


@pytest.fixture(scope="session")
def parquet_testing() -> Path:
    """``../shared/testdata/parquet-testing`` (Apache's Parquet test files)."""
    root = SHARED / "testdata" / "parquet-testing"
    assert (root / "bad_data").is_dir() and (root / "data").is_dir(), (
        f"{root} is missing: the repository must sit beside ../shared (CI checks it out there)")
    return root


@pytest.fixture()
def fault_proxy(s3_endpoint: str):
    """A FaultProxy in front of the session's S3 server (no faults until a test adds rules)."""
    from faultproxy import FaultProxy

    with FaultProxy(s3_endpoint) as proxy:
        yield proxy

"""Shared fixtures for the data-plane, worker and job tests: a real S3 API server on loopback
(moto's server mode), a real multi-node local Ray cluster (``ray.cluster_utils.Cluster``, two
nodes, started once per session), a tiny random-weight checkpoint, and small Parquet inputs."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """moto's S3 server on 127.0.0.1; the environment points the AWS chain at it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                              "AWS_REGION")}
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"})
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh bucket on the loopback S3 server."""
    import boto3

    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory):
    """A two-node local Ray cluster (2 logical CPUs each), connected to this process."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ["HYMBA_CACHE"] = str(tmp_path_factory.mktemp("hymba-cache"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Hymba checkpoint (HF layout, real tokenizer)."""
    from hymba_batch.model.checkpoints import tiny_config, write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny-model"), tiny_config(), seed=0)


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The real Hymba tokenizer files (no weights needed)."""
    return Path(__file__).resolve().parents[1] / "model" / "assets" / "tokenizer"

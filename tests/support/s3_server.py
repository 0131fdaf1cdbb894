"""moto's S3 server on loopback for tests, and the environment that points boto3, fsspec and pyarrow at it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def s3_server(monkeypatch, *buckets: str) -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1, create `buckets`, set the AWS variables (endpoint included) through
    `monkeypatch` so this process and any it starts afterwards (a local Ray's workers) use it; yields the
    endpoint URL."""
    import boto3
    import fsspec
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
    }.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=endpoint)
    for bucket in buckets:
        client.create_bucket(Bucket=bucket)
    fsspec.filesystem("s3").invalidate_cache()
    try:
        yield endpoint
    finally:
        fsspec.filesystem("s3").clear_instance_cache()
        server.stop()


@pytest.fixture
def s3_bucket(monkeypatch):
    """A bucket on moto's S3 server, as the shards' location s3://shards/cifar10."""
    with s3_server(monkeypatch, "shards"):
        yield "s3://shards/cifar10"

"""A local S3-compatible server for tests: moto in server mode (what s3fs's own tests use),
in a thread of the test process, reached through the usual AWS environment variables, so
subprocesses (gmeta train, predict workers) reach it too."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
       "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def moto_server():
    """Start the server, point the environment at it; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server._server.server_address  # port 0: the one the OS chose
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*ENV, "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_PROFILE"]}
    os.environ.update(ENV, AWS_ENDPOINT_URL=endpoint)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def new_bucket() -> str:
    """A fresh bucket on the server; returns its s3:// URL."""
    import boto3

    name = f"gmeta-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    _clear_fsspec_cache()
    return f"s3://{name}"


def _clear_fsspec_cache() -> None:
    """s3fs caches listings per instance: a bucket made behind its back must be seen."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()

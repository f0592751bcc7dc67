"""A real S3 endpoint on 127.0.0.1 for tests: moto's server in this process, with a bucket.

pyarrow's S3 file system, Ray Tune's storage and boto3 all reach it through AWS_ENDPOINT_URL,
which ``env`` holds (with fake credentials) for the processes a test starts.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no probing of 169.254.169.254 for credentials
}


@dataclass
class S3Server:
    endpoint: str
    bucket: str

    @property
    def env(self) -> dict[str, str]:
        return dict(S3_ENV, AWS_ENDPOINT_URL=self.endpoint)


@contextmanager
def s3_server(bucket: str = "bnstudy-test") -> Iterator[S3Server]:
    """Start moto's S3 server on a free port of 127.0.0.1 with ``bucket`` made; stop it after."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a log line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, **{
            "aws_access_key_id": "testing", "aws_secret_access_key": "testing",
            "region_name": "us-east-1"}).create_bucket(Bucket=bucket)
        yield S3Server(endpoint, bucket)
    finally:
        server.stop()

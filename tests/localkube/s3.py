"""A real S3 server over HTTP on loopback (moto's standalone server), with a bucket and credentials,
and the Secret a FineTuneJob refers to for them."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import boto3
from s3server import TEST_CREDENTIALS, start_moto_server

SECRET_NAME = "finetune-s3"


@dataclass
class S3:
    endpoint_url: str
    bucket: str
    access_key: str = TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"]
    secret_key: str = TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    region: str = TEST_CREDENTIALS["AWS_DEFAULT_REGION"]
    stop: Callable[[], None] = field(default=lambda: None, repr=False)

    def client(self) -> Any:
        """A boto3 S3 client for this server, with its credentials (not the environment's)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def secret(self, namespace: str, name: str = SECRET_NAME) -> dict[str, Any]:
        """The credentials Secret (keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) as a manifest."""
        data = {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        }


def start_s3(bucket: str = "finetune") -> S3:
    """Start the server on a free port and create `bucket`; call .stop() when done."""
    endpoint, stop = start_moto_server()
    s3 = S3(endpoint_url=endpoint, bucket=bucket, stop=stop)
    s3.client().create_bucket(Bucket=bucket)
    return s3

"""A real S3 server for tests: moto's standalone server over HTTP on a loopback port.

Clients talk to it through boto3 exactly as they would to AWS or MinIO (signing, HTTP, multipart),
unlike moto's in-process mocks. Its state lives in this process, so a server stopped and started
again on the same port keeps its buckets: tests use that to make S3 unreachable for a while.
"""

from __future__ import annotations

from collections.abc import Callable

from moto.server import ThreadedMotoServer

TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
"""Environment for boto3 clients of the test server (moto accepts any credentials)."""


def start_moto_server(port: int = 0) -> tuple[str, Callable[[], None]]:
    """Start a moto S3 server on 127.0.0.1 (`port` 0: a free one). Returns (endpoint, stop);
    after stop the port refuses connections and may be bound again."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    host, bound = server.get_host_and_port()

    def stop() -> None:
        server.stop()
        # stop() ends serve_forever but leaves the socket listening: connections would hang
        # instead of being refused, and the port could not be bound again.
        server._server.server_close()

    return f"http://{host}:{bound}", stop

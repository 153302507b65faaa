"""Helpers for tests that start a server of their own on 127.0.0.1."""

import subprocess
import time
import urllib.request


def wait_until_healthy(server: subprocess.Popen, uri: str, seconds: float) -> None:
    """Wait until `uri`/health answers 200; fail if the server exits or `seconds` pass first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                return
        except OSError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
        time.sleep(0.5)

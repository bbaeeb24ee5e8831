"""Joining a Ray cluster, with a clear error when the address does not answer."""

from __future__ import annotations

import logging
import re
import socket

from pyagent.errors import ConfigError

NAMESPACE = "pyagent"
# Ray notices a dead node after health checks fail: these settings (for `ray start --head
# --system-config`) make that about a second instead of Ray's default of about 30.
FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 300,
                          "health_check_timeout_ms": 300, "health_check_failure_threshold": 3}
_ADDRESS = re.compile(r"(?:ray://)?(?P<host>\[[^\]]+\]|[^:/\s]+):(?P<port>\d{1,5})")


def connect(address: str, timeout_s: float = 5.0) -> None:
    """Join the cluster at `address`: `auto` (the one `ray start` runs on this machine) or
    HOST:PORT of its head; a cluster that does not answer is a one-line `ConfigError`."""
    import ray

    if ray.is_initialized():
        return
    if address != "auto":
        match = _ADDRESS.fullmatch(address)
        if match is None:
            raise ConfigError(f"--ray {address!r}: give 'auto' or the head node's HOST:PORT "
                              "(for example 127.0.0.1:6379)")
        host, port = match["host"].strip("[]"), int(match["port"])
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
        except OSError as exc:
            raise ConfigError(f"--ray {address}: no Ray cluster answers there "
                              f"({exc.strerror or exc}); start one with `ray start --head`"
                              ) from None
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False,
                 logging_level=logging.WARNING, configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"--ray {address}: cannot join the cluster: "
                          f"{str(exc).splitlines()[0]}") from None
    _cluster_messages_to_stderr()


def _cluster_messages_to_stderr() -> None:
    """Ray prints the cluster's error messages (a node died, with its raylet's last log lines)
    on the driver's standard output; send them to standard error, where diagnostics belong, so
    that what PyAgent prints on standard output stays its own."""
    from ray._private import worker

    original = worker.print_to_stdstream
    if getattr(original, "to_stderr", False):
        return

    def to_stderr(data: dict, ignore_prefix: bool) -> None:
        original({**data, "is_err": True}, ignore_prefix)

    to_stderr.to_stderr = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = to_stderr

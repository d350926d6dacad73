"""Socket checks the server commands run before they start: a port they cannot bind, a peer they cannot reach.

Each fails with one click usage error naming the address and the option to change, instead of the
traceback or silent retry loop of the server underneath (uvicorn, TVM's RPC server and tracker).
"""

from __future__ import annotations

import click


def check_port_free(host: str, port: int, flag: str) -> None:
    """Fail with a one-line usage error when ``host:port`` cannot be bound now: the port is in use or not ours
    to take (the fix names ``flag``), or the host is no address of this machine (the fix names --host)."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
                raise click.UsageError(f"cannot listen on {host}:{port} ({reason}): --host must be an address of "
                                       f"this machine (127.0.0.1, or 0.0.0.0 for all)") from None
            raise click.UsageError(f"cannot listen on {host}:{port} ({reason}); pick another {flag}") from None


def check_tracker_reachable(tracker: str) -> None:
    """Fail with one usage error when ``tracker`` is not HOST:PORT or nothing listens there now.

    Why up front: TVM's server retries the tracker for a minute, then dies in a thread with a traceback while
    the process keeps running, registered nowhere.
    """
    import socket

    from adntn_deploy.compiler.tuning import split_host_port

    address = split_host_port(tracker)
    if address is None:
        raise click.UsageError(f"--tracker must be HOST:PORT, not {tracker!r}")
    try:
        socket.create_connection(address, timeout=10).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise click.UsageError(f"cannot reach the RPC tracker at {tracker} ({reason}): start it first (adntn-deploy "
                               "rpc tracker on the host, and the ssh tunnel of docs/tuning.md), or fix --tracker") from None

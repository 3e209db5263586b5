"""Container health check over the standard gRPC health service.

    python -m services.common.healthcheck HOST:PORT [SERVICE] [--timeout SECONDS]

Exit status 0 when SERVICE (default "", the whole server) is SERVING, 1 otherwise. Health
checks need no token; a server with TLS needs --tls-ca-file (and, for mutual TLS,
--tls-cert-file and --tls-key-file), and --tls-server-name when the certificate does not
name HOST (a container checking itself on 127.0.0.1).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.channels import ChannelSecurity, sync_channel
from services.common.client_flags import ClientFlagError, add_security_flags, security_from_args


def check(
    target: str,
    service: str = "",
    timeout_s: float = 3.0,
    security: ChannelSecurity | None = None,
    server_name: str = "",
) -> tuple[bool, str]:
    """(serving, what to print)."""
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    with sync_channel(target, security, options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return False, f"{target} {service or '(server)'}: {exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, (
        f"{target} {service or '(server)'}: {status}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.healthcheck")
    parser.add_argument("target", help="host:port of the gRPC server")
    parser.add_argument("service", nargs="?", default="", help="service name; empty = server")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    add_security_flags(parser, token=False)
    parser.add_argument("--tls-server-name", default="", help="name the certificate holds")
    args = parser.parse_args(argv)
    try:
        security = security_from_args(args)
    except ClientFlagError as exc:
        parser.error(str(exc))
    serving, message = check(
        args.target, args.service, args.timeout, security, args.tls_server_name
    )
    print(message, file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())

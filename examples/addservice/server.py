"""Serve the add service and register it: ``python -m discovery_examples.addservice.server``.

``--backend memory://`` (default) keeps the registration in this process;
``--backend consul://127.0.0.1:8500`` lets a client in another process find it.
SIGTERM or Ctrl-C leaves cleanly: NOT_SERVING, deregister, drain, stop.
"""

from __future__ import annotations

import argparse
import logging
from concurrent import futures

import grpc
from discovery_examples.addservice import add_pb2, add_pb2_grpc

import discovery_core as dc

SERVICE = "add"


class Adder(add_pb2_grpc.AdderServicer):
    """Adds two int64; ``name`` tells callers which instance answered (metadata)."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.calls = 0

    def Add(self, request: add_pb2.AddRequest, context: grpc.ServicerContext) -> add_pb2.AddReply:
        self.calls += 1
        if self.name:
            context.set_trailing_metadata((("instance", self.name),))
        return add_pb2.AddReply(v=request.a + request.b)


def make_server(adder: Adder, executor: futures.ThreadPoolExecutor) -> grpc.Server:
    """A grpc server with the add service on it (not started: ``dc.serve`` does that).
    grpc never shuts ``executor`` down: its owner does."""
    server = grpc.server(executor)
    add_pb2_grpc.add_AdderServicer_to_server(adder, server)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="memory://", help="discovery backend URL (default: memory://)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (default: an ephemeral one)")
    parser.add_argument("--advertise", default=None, help="address to register (default: first non-loopback IPv4)")
    parser.add_argument("--drain", type=float, default=1.0, help="seconds between deregistering and stopping")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with dc.connect(args.backend) as backend, futures.ThreadPoolExecutor(max_workers=8) as executor:
        adder = Adder()
        server = make_server(adder, executor)
        with dc.serve(server, backend, SERVICE, port=args.port, advertise=args.advertise, drain=args.drain) as served:
            adder.name = served.instance.id
            print(f"add service {served.instance.id} at {served.target}; Ctrl-C to stop", flush=True)
            served.wait_for_termination()
        print(f"stopped after {adder.calls} calls", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

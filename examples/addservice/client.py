"""Call the add service through discovery: ``python -m discovery_examples.addservice.client``.

Finds the instances of ``add`` through ``--backend`` and spreads calls over the
healthy ones; prints which instance answered each call.
"""

from __future__ import annotations

import argparse
import time

import grpc
from discovery_examples.addservice import add_pb2, add_pb2_grpc
from discovery_examples.addservice.server import SERVICE

import discovery_core as dc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="memory://", help="discovery backend URL (default: memory://)")
    parser.add_argument("--calls", type=int, default=10, help="how many calls (default: 10)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between calls")
    parser.add_argument("--timeout", type=float, default=5.0, help="deadline of each call, waiting for an instance")
    args = parser.parse_args(argv)
    failed = 0
    with dc.connect(args.backend) as backend, dc.discovery_channel(backend, SERVICE) as channel:
        stub = add_pb2_grpc.AdderStub(channel)
        for i in range(args.calls):
            try:
                reply, call = stub.Add.with_call(
                    add_pb2.AddRequest(a=i, b=i * i), timeout=args.timeout, wait_for_ready=True
                )
            except grpc.RpcError as error:
                failed += 1
                code = error.code() if isinstance(error, grpc.Call) else None
                print(f"{i} + {i * i}: failed: {code}: {error.details() if isinstance(error, grpc.Call) else error}")
            else:
                answered = dict(call.trailing_metadata() or ()).get("instance", "?")
                answered = answered.decode() if isinstance(answered, bytes) else answered
                print(f"{i} + {i * i} = {reply.v}  (from {answered})")
            time.sleep(args.interval)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

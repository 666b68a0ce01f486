"""The client side: discovery channels, one concept a file (grpc-go's ``balancer/``).

- ``endpoint``: one instance's own grpc channel and its state (the SubConn).
- ``picker``: the policies; an immutable picker per change, ``pick()`` per call.
- ``pool``: the endpoints of one channel, kept by instance id, and its picker.
- ``health_watch``: what an endpoint's health ``Watch`` stream means for it.
- ``retry``: which failed calls run again, and one call's attempts.
- ``errors``: the status a call gets when no instance takes it.
- ``base``: what the sync and aio channels share above the pool.
- ``sync`` and ``aio``: the ``grpc.Channel`` and ``grpc.aio.Channel`` faces, each
  with its pool's I/O (threads, or tasks on the caller's loop).

The public names are re-exported by ``discovery_core`` and ``discovery_core.aio``.
"""

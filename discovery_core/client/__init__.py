"""The client side: discovery channels, one concept a file (grpc-go's ``balancer/``).

- ``endpoint``: one instance's own grpc channel (the SubConn); C-core follows its
  health on it, so its state is read, never watched by a thread.
- ``picker``: the policies; a picker per change of the set, ``pick()`` per call.
- ``pool``: the endpoints of one channel, kept by instance id, and its picker.
- ``select``: which listed instances get endpoints (fail-open).
- ``subset``: which of those this client connects to (a shared ring, A68-like).
- ``retry``: which failed calls run again, and one call's attempts.
- ``errors``: the status a call gets when no instance takes it.
- ``base``: what the sync and aio channels share above the pool.
- ``sync`` and ``aio``: the ``grpc.Channel`` and ``grpc.aio.Channel`` faces, each
  with its pool's I/O (a lock and condition, or the caller's loop).

The public names are re-exported by ``discovery_core`` and ``discovery_core.aio``.
"""

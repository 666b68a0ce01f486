"""The add service: ``Add(a, b) -> v``, its generated code, a server and a client."""

"""Transports carry messages between shards: inproc (virtual time), ray and grpc (wall clock)."""

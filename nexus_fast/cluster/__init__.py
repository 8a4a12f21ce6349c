"""The replicas room: cluster mode on etcd (issue 12).

``etcd`` is the asyncio etcd v3 client (grpc.aio on etcd's own protocol), ``etcd_procs``
starts real etcd members for tests, benchmarks and ``make run-cluster``. Embedded mode
(``[cluster] enabled = false``) imports nothing from here but ``config`` (the section's
dataclass); ``replica`` wires a server into a cluster, ``forward`` routes a follower's calls.
"""

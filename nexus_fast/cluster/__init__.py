"""Cluster mode: replicas on etcd (docs/cluster.md)."""

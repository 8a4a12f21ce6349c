"""Cluster mode: replicas of one control plane on etcd (docs/cluster.md)."""

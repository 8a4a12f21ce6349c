"""nexus-bench: end-to-end and micro benchmarks of nexus_fast, each with a baseline.

``nexus-bench SCENARIO`` (see :mod:`nexus_fast.benchmark.cli`) drives a running or a
freshly spawned server, measures throughput and latency (``histogram``), optionally
measures the bare grpc.aio / picows limit in the same run (``baselines``), and prints or
writes the report (``report``).
"""

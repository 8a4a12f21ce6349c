"""Telemetry: Prometheus metrics shared by every component."""

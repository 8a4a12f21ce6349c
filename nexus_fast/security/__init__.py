"""Trust: identity, the permission table, roles and the port adapters (docs/security.md)."""

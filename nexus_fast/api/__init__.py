"""API adapters (gRPC, WebSocket, HTTP): they translate wire formats and authorise.

The core knows nothing of wire formats; these modules call into it.
"""

"""Wire formats: the core hands records and events here and gets bytes or JSON back.

* :mod:`~nexus_fast.codec.protowire` — protobuf encodings done by hand on hot paths
  (varints, event bodies, the node's view of a command) and plain ones elsewhere.
* :mod:`~nexus_fast.codec.json` — JSON views of records (HTTP API, WebSocket payloads).
* :mod:`~nexus_fast.codec.frames` — :class:`EventEnvelope` (one committed event, each
  wire encoding made once and shared) and the gRPC / WebSocket event frames built from it.
* :mod:`~nexus_fast.codec.tokens` — opaque page tokens.

Nothing here imports :mod:`nexus_fast.core`: the core depends on the codecs, not back.
"""

"""Ingest: HTTP request -> authenticated raw record on raw.<source>: the thin receiver
(docs/architecture.md, "The raw record").

Nothing here parses a body beyond what authentication needs; adapters run later, in `pipeline.stream`.
"""

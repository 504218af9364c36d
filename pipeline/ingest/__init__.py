"""Ingest: HTTP request -> authenticated raw record on raw.<source> (the thin receiver, architecture.md §1).

Nothing here parses a body beyond what authentication needs; adapters run later, in `pipeline.stream`.
"""

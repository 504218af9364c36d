"""Stream: raw.<source> -> canonical events on events.canonical, or dead letters on events.dlq.

`record_outcomes` is the pure driver over one raw record; `normalize_batch` turns consumed raw records into
keyed batches and dead letters; `normalize_stage` and `dedup_stage` are the two stages'
consume -> process -> ack -> commit loops; `worker` hosts them in a Faust worker.
"""

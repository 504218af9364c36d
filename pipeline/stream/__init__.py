"""Stream: raw.<source> -> canonical events on events.canonical, or dead letters on events.dlq.

`normalizing` is the pure driver over one raw record; `normalize` and `dedup_stage` are the two stages'
consume -> process -> ack -> commit loops; `worker` hosts them in a Faust worker.
"""

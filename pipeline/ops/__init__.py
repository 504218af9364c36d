"""Operator tools beside the flow: replay raw topics, inspect and redrive the dead-letter queue, tail topics.

They call the stream's pure functions (never a worker) and read topics with the Kafka client factories.
"""

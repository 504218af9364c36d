"""Kafka: the client factories and the one place that maps client errors (`clients`), and the local broker
(`local`, Apache Kafka in KRaft mode from Maven Central jars, for `headwater up` and the tests).
"""

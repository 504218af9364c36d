"""Rewards: rewards.outbound -> signed webhooks to each tenant, with retries and de-dup on the reward id.

`records` types what crosses the rewards topics, `signing` the HMAC headers, `webhooks` one delivery,
`dispatcher` the Faust agents and tables that schedule them.
"""

"""Shared builders for the tests: media, shard corpora, configs and tiny modules."""

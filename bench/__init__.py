"""Benchmark of kerrickpt against raw CRIU and the sequential export pipeline (issue 6)."""

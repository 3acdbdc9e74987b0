"""Benchmarks run as programs: `commlib bench NAME ...` (see commlib.bench.pack)."""

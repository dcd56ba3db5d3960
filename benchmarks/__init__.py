"""GPU benchmarks (results in benchmarks/results/, summary in BENCHMARKS.md). Each script also runs as
`python benchmarks/<name>.py`; as a package they sit at the top of the import layers (ARCHITECTURE.md)."""

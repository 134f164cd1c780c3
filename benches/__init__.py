"""pytest-benchmark suites (bench_*.py), their fixtures and the report: `make bench`."""

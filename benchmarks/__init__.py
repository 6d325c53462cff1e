"""Benchmarks of optimum-splitquant (run from the repository root; see benchmarks/README.md)."""

"""Benchmark code paths on tiny inputs."""

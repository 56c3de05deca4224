"""Benchmarks: each module has `run(quick: bool) -> dict` returning {"cases": [...]} (see cli `bench`)."""

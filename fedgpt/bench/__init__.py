"""Benchmarks and the results table: they run fedgpt's entry points and read what they write. Nothing in
fedgpt imports this package."""

"""Entry points and benchmarks (run as `python -m experiments.<name>`)."""

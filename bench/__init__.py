"""Runnable programs that load and break a real fundgate stack (`python -m bench.chaos`)."""

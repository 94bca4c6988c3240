"""Throughput benchmarks of the training step and of the full loop (``foundation bench step`` / ``bench e2e``)."""

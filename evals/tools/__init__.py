"""Tools: speed benchmarks and demo-checkpoint training."""

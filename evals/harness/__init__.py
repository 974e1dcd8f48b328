"""The lm-eval harness: the gdn2 backend, the runner, the request cache, data parallelism and guards."""

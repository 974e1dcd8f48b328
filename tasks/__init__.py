"""lm-eval task plugins (an lm-eval include_path) and the paper's suites; see tasks/README.md and catalog.py."""

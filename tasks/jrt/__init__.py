"""The "Just read twice" recall tasks (Table 4): JRT prompts, 2K-token context windows, the contains metric."""

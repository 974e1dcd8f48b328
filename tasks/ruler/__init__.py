"""RULER needle-in-a-haystack tasks, generated locally (niah.py) and exposed to lm-eval (niah_utils.py)."""

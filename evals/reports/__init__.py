"""Reports from stored results: the results schema, tables, comparisons, plots and the Markdown report."""

"""Plotly figure helpers, one module per topic (census, pruning, selection). Each returns the figure."""

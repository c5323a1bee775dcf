"""Showing results: attention views, notebook summaries and plotly figures. Imports every research stage,
never ``series``."""

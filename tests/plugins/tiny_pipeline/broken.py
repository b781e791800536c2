"""A plug-in module whose import fails, as one with a missing dependency does."""

raise ImportError("No module named 'tiny_pipeline_dependency'")

"""Scripts that replay the paper's experiments and time the package."""

"""The glue of CLI commands that need more than a few lines: config in, printed report out."""

"""`everyseg report`: a self-contained HTML page of one or several runs (the report extra)."""

from everyseg.report.page import write_report

__all__ = ["write_report"]

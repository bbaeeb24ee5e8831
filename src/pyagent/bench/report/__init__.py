"""Reports: tabular records as JSON, CSV or SQLite, and self-contained HTML with plots."""

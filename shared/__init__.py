"""Code shared by the ingest worker, the query API and the CLI."""

__version__ = "0.1.0"

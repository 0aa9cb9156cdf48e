"""Ingest: what each stage does (``stages``), when and where it runs (``scheduler``), how
failures are waited out (``retry``) or contained (``supervise``), what came of it (``report``)."""

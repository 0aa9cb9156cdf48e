"""Re-index: change the embedding spec of a live index without downtime (docs/migration.md)."""

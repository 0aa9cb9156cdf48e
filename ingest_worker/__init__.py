"""The Kafka ingest worker: image-uploaded events in, vectors in Qdrant out."""

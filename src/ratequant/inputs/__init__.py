"""What a run reads: models (local, hub, embedded, assembled from chunk packages) and text corpora."""

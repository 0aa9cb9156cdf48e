"""``imgsearch eval``: measure retrieval quality, speed and memory on a labelled dataset."""

"""The ``imgsearch`` command line."""

"""Inference engines behind one embedding-model interface (see base.py)."""

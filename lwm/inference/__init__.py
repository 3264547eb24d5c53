"""Inference: the one generation engine (`engine.Engine`) and what the entry points share around it."""

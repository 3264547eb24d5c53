"""Synthetic data worlds (the foundation layer: numpy only): `world`, the video-language world that the
vision half is trained and evaluated on offline."""

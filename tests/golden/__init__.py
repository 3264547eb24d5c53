"""The golden outputs of every entry point: cases.py runs them (and rewrites outputs.json with --write)."""

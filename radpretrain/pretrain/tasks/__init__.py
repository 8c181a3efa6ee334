"""Pretext tasks, one file each, registered by name."""

"""Embed an archive with an exported encoder and report near-duplicates, nearest neighbours and 2D maps."""

"""Pretraining encoders on shards with Accelerate."""

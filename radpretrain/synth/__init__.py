"""Synthetic PACS exports (DICOM radiographs with the header variety of real archives) for tests, demo and bench."""

from __future__ import annotations

from radpretrain.synth.archive import SYNTH_JSON, SynthSummary, generate

__all__ = ["SYNTH_JSON", "SynthSummary", "generate"]

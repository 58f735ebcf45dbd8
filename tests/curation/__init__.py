"""Tests of dinov2_core.curation (paper §3 / App. A data-curation algorithms)."""

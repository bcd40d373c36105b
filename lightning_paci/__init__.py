"""lightning_paci: pipeline-parallel training for Lightning with the PACI schedule."""

"""Proof tooling shipped with the product: the sandbox harness, demo, bench and chaos."""

"""Proof that a clone is what it claims: ``logits`` (per-rank function preservation), ``weights`` (every
stored tensor against the clone's recorded definition) and ``report`` (both, as one verdict)."""

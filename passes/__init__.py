"""Substitution passes: one module per pass (see surgeon.pass_manager.REGISTRY)."""

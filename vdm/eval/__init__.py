"""Held-out evaluation: prompts, seeded generation, scoring and the report."""

"""Caching policies: per step and per layer, what to refresh and which tokens to recompute."""

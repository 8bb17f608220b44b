"""Shared test helpers: tiny models in the real host, the diffusers twin, the live server."""

"""Talking to image registries: the distribution API client, its authentication and transfers."""

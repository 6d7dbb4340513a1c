"""Sluice API service: the Falcon app (the producer) and its gunicorn runner."""

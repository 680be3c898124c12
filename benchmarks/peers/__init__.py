"""Peer systems the project's models are measured against (written from their papers)."""

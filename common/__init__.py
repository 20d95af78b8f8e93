"""Shared by server and clients: the maths, payloads, transfer, data, base model and settings."""

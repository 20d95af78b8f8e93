"""Flower side of bench/peers.py: a ServerApp and a ClientApp that only move payloads."""

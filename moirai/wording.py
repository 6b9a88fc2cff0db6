"""Counts in words for what Moirai prints: "1 node", "2 nodes"."""

from __future__ import annotations


def counted(n: int, noun: str) -> str:
    """`n` and `noun`, plural unless `n` is 1 (nouns that take an "s")."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"

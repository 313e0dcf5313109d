"""Seeds derived from named parts, the same in every process, rank, worker and Python run (no ``hash()``,
whose value changes between interpreters).

Two byte layouts exist and each fixes a family of random draws that recorded results depend on (the golden
losses of ``tests/test_golden.py``), so neither can take the other's place without moving them:
:func:`derive_seed` for the data stream and the VAE's posterior noise, :func:`keyed_seed` for the
diffusion stage's per-sample draws (noise, time, caption dropout)."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from parts joined by ":" (SHA-256, first 8 bytes little-endian, shifted right once)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def keyed_seed(base: int, key: str, salt: str) -> int:
    """A 63-bit seed from (base seed, sample key, salt), NUL-separated (BLAKE2b, 8 bytes, top bit cleared)."""
    digest = hashlib.blake2b(f"{base}\0{key}\0{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)

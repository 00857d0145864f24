"""Seeds derived from the run seed, so every random draw is a function of (seed, where it happens) and a resumed or
re-run job replays exactly.

`stream_seed(seed, i)` numbers the i-th draw of one stream (a step, an epoch's shuffle, a generated task): an affine
map, so within a stream distinct i give distinct seeds. `derive_seed(*parts)` hashes several coordinates at once
(seed, step, rank, turn), where an affine sum would make different tuples coincide.
"""

from __future__ import annotations

import hashlib

STREAM_STRIDE = 1_000_003  # a prime above any step, epoch or task count: seeds of different run seeds do not overlap


def stream_seed(seed: int, i: int) -> int:
    """The seed of draw `i` of the run seed's stream: seed * 1_000_003 + i."""
    return seed * STREAM_STRIDE + i


def derive_seed(*parts: int) -> int:
    """A 63-bit seed hashed from `parts` (e.g. run seed, step, rank, turn): distinct tuples give unrelated seeds,
    where sums such as seed + step + i coincide across parts."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1

"""Aspect buckets: the training sizes for a resolution, the bucket of an image, its crop.

Every image is trained at a bucket ``(w, h)`` whose sides are multiples of ``bucket_step`` and
whose area is at most ``resolution ** 2``; the bucket is the one whose aspect ratio is closest
to the image's (kohya/SimpleTuner area-preserving bucketing). The image is scaled so it covers
the bucket (never upscaled) and cropped to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def bucket_candidates(
    resolution: int, step: int, max_aspect: float = 2.0, min_side: int | None = None
) -> list[tuple[int, int]]:
    """All buckets ``(w, h)`` for these settings, sorted.

    For every side length ``s`` (a multiple of `step`) the largest other side with
    ``w * h <= resolution ** 2`` is taken, in both orientations; buckets beyond `max_aspect`
    or with a side below `min_side` (default `step`) are dropped. The square bucket
    ``(r, r)``, ``r = resolution // step * step``, is always among them.
    """
    area = resolution * resolution
    low = max(step, min_side or step)
    found: set[tuple[int, int]] = set()
    side = step
    while side * step <= area:
        other = area // side // step * step
        for w, h in ((side, other), (other, side)):
            if min(w, h) >= low and max(w, h) <= max_aspect * min(w, h) + 1e-9:
                found.add((w, h))
        side += step
    return sorted(found)


def choose_bucket(
    width: int, height: int, candidates: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """The candidate whose aspect ratio is closest (in log space) to ``width / height``.

    Ties go to the larger area, then to the smaller width (deterministic).
    """
    target = math.log(width / height)
    return min(candidates, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1], b[0]))


def crop_box(
    size: tuple[int, int], bucket: tuple[int, int], fx: float = 0.5, fy: float = 0.5
) -> tuple[float, float, float, float]:
    """The region of an image of `size` that, scaled, fills `bucket` exactly.

    The region has the bucket's aspect ratio and is as large as the image allows; `fx`/`fy`
    in 0..1 place it (0.5 = centre).
    """
    iw, ih = size
    bw, bh = bucket
    if iw * bh > ih * bw:  # wider than the bucket: full height
        rw, rh = ih * bw / bh, float(ih)
    else:
        rw, rh = float(iw), iw * bh / bw
    left, top = (iw - rw) * fx, (ih - rh) * fy
    return (left, top, left + rw, top + rh)

"""Allocator settings for CPU work with a 50k-token vocabulary."""

import ctypes


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the kernel.

    A GPT-2 vocabulary makes logits (and their gradients) hundreds of MB. By default glibc
    maps each such block afresh and the kernel zeroes every page of it on first touch,
    which on a CPU can cost more than the maths: this trained the demo 2.3x faster, and
    brought ``run_with_cache`` of every hook from 1.25x to 1.04x a plain forward. The
    setting is process-wide; training and the analysis scripts call it, notebooks may.
    Returns False where the C library is not glibc (nothing is changed).

    >>> keep_freed_memory()
    True
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 2**31 - 1) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False

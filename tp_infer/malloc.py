"""glibc malloc settings for running the model on the CPU.

By default glibc serves every allocation over a dynamic threshold (128 KiB to 32 MiB) with a fresh mmap and trims
freed heap memory back to the OS, so each step's activations, gathered cache blocks and scores arrive as new pages:
the page faults cost more than the arithmetic (a 1000 x 512 RMSNorm took 3.0 ms instead of 0.3 ms here). Keeping
freed memory in the heap, as tcmalloc or jemalloc would, makes a step reuse the last step's pages.
"""

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 1 << 30  # allocations under 1 GiB come from the heap; the KV pool and the weights stay mmapped
TRIM_THRESHOLD = (1 << 31) - 1  # never give freed heap memory back while the process runs (the largest int value)


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (once per process); False where malloc is not glibc's."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))

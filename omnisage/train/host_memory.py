"""Keep freed host memory in the process, so XLA's CPU buffers are not page-faulted every step.

Why: on the CPU backend every jitted step allocates its temporaries (the B x B logits of an
in-batch softmax are 144 MB at B = 6000) with malloc and frees them at the end of the step. glibc
serves blocks that big with a fresh mmap and returns them with munmap, and XLA's worker threads
allocate from per-thread arenas that fall back to mmap whatever the mmap limit says. So each step
the kernel maps, zeroes and faults in every temporary page again (benchmarks/vs_tfrs.py measures
the cost; figures in docs/performance.md).

`reuse_freed_host_memory()` sets three glibc malloc options (mallopt(3)), the in-process
equivalent of running under tcmalloc/jemalloc, which TensorFlow and JAX users often LD_PRELOAD
for the same reason:
  M_ARENA_MAX = 1           every thread allocates from the main heap, which can grow with brk
  M_MMAP_MAX = 0            no block is mmap'd, so a freed block stays in the heap for reuse
  M_TRIM_THRESHOLD = 2 GiB  free memory at the top of the heap is kept, up to 2 GiB
The cost: resident memory stays near its peak (the heap is not given back), and threads share one
arena lock, which is cheap next to a step's compute. Call it before JAX (or TensorFlow) starts its
thread pools; threads that already own an arena keep it. Elsewhere than glibc it does nothing.
"""

import ctypes
import ctypes.util
import functools

# mallopt(3) parameter numbers, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD_BYTES = 2**31 - 1   # mallopt's value is a C int


@functools.cache
def _glibc() -> ctypes.CDLL | None:
  """The process's C library if it is glibc (it has mallopt and gnu_get_libc_version)."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.gnu_get_libc_version()
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc
  except (OSError, AttributeError):
    return None


def reuse_freed_host_memory() -> bool:
  """Sets the malloc options above; True if all three took effect (glibc), False elsewhere."""
  libc = _glibc()
  if libc is None:
    return False
  settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
  return all(libc.mallopt(param, value) == 1 for param, value in settings)

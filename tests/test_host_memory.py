"""omnisage.train.host_memory: freed host memory is reused instead of page-faulted in again.

Each case runs in a fresh interpreter, because malloc settings are per process and must be set
before the threads that allocate exist. Page faults are counted with getrusage(ru_minflt).
"""

import json
import statistics
import subprocess
import sys

import pytest

from omnisage.train import host_memory
from tests.helpers import subprocess_env

pytestmark = pytest.mark.skipif(host_memory._glibc() is None, reason="needs glibc's mallopt")

# A 64 MiB block malloc'd, written and freed by a worker thread, three times; prints the minor
# page faults of each round. 64 MiB is 16,384 pages of 4 KiB.
THREAD_ALLOC = """
import ctypes, json, resource, threading
from omnisage.train.host_memory import reuse_freed_host_memory
if {reuse}:
  assert reuse_freed_host_memory() is True
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
size, faults = 64 << 20, []
def work():
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(ctypes.c_void_p(block))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
for _ in range(3):
  thread = threading.Thread(target=work)
  thread.start()
  thread.join()
print(json.dumps(faults))
"""

# A jitted softmax gradient over a 4096 x 4096 logits temporary (64 MiB), run 10 times; prints the
# minor page faults of each run after the first (compilation).
JAX_STEP = """
import json, resource
from omnisage.train.host_memory import reuse_freed_host_memory
if {reuse}:
  assert reuse_freed_host_memory()
import jax, jax.numpy as jnp
def loss(q, c):
  return jax.nn.logsumexp(q @ c.T, axis=1).sum()
grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
q = jax.random.normal(jax.random.key(0), (4096, 32))
c = jax.random.normal(jax.random.key(1), (4096, 32))
jax.block_until_ready(grad(q, c))
faults = []
for _ in range(9):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(grad(q, c))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""
PAGES_64MIB = (64 << 20) // 4096


def run_faults(script: str, reuse: bool) -> list[int]:
  env = subprocess_env()   # the repo on PYTHONPATH, JAX on the CPU
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-c", script.format(reuse=reuse)], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_thread_block_faulted_once_with_reuse_every_time_without():
  default = run_faults(THREAD_ALLOC, reuse=False)
  reuse = run_faults(THREAD_ALLOC, reuse=True)
  # glibc's default: a worker thread's big block is mmap'd and unmapped, so every round faults in
  # all its pages; with reuse it stays in the heap after the first round.
  assert min(default) > 0.9 * PAGES_64MIB, default
  assert reuse[0] > 0.9 * PAGES_64MIB, reuse
  assert max(reuse[1:]) < 0.05 * PAGES_64MIB, reuse


def test_jitted_step_temporaries_not_faulted_again_with_reuse():
  default = run_faults(JAX_STEP, reuse=False)
  reuse = run_faults(JAX_STEP, reuse=True)
  # The 64 MiB logits are faulted in on every step by default. With reuse the heap holds them after
  # the first step; now and then a small allocation lands in the freed block and the heap grows
  # by one more block (a run with a full set of faults), so the test takes the median.
  assert min(default) > 0.5 * PAGES_64MIB, default
  assert statistics.median(reuse) < 0.05 * PAGES_64MIB, reuse

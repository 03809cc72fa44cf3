"""init_ray: a private local Ray gets the object store it is asked for (prepare's
data.ray_object_store_gb), so its blocks spill to disk beyond it."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = """
import json
from omnisage.data.ray_runtime import init_ray
print(json.dumps(init_ray(None, {gb})))
"""


def test_private_ray_gets_the_object_store_it_asks_for():
  # A child process: this session's tests already joined the two-node cluster.
  env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
  out = subprocess.run([sys.executable, "-c", CHILD.format(gb=0.25)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  resources = json.loads(out.stdout.strip().splitlines()[-1])
  assert abs(resources["object_store_memory"] - 0.25 * 1024 ** 3) < 0.01 * 1024 ** 3
  assert resources["CPU"] >= 1

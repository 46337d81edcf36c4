"""raad_kernels.allocator: freed large blocks are reused instead of faulted in afresh."""

import json
import os
import subprocess
import sys

import pytest

from raad_kernels.allocator import keep_freed_memory

# a model-like loop: 50 MiB activations (above glibc's largest default mmap threshold, 32 MiB)
# made and freed every iteration; prints the page faults of each iteration
LOOP = """
import json, resource, torch, torch.nn.functional as F
from raad_kernels.allocator import keep_freed_memory
status = keep_freed_memory()
torch.set_num_threads(1)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.randn(8, 16, 128, 128)
w, w2 = torch.randn(96, 16, 1, 1), torch.randn(16, 96, 1, 1)
out = []
for _ in range(8):
    f0 = faults()
    F.conv2d(F.relu(F.conv2d(x, w)), w2)
    out.append(faults() - f0)
print(json.dumps({"status": status, "faults": out}))
"""


def _loop(env_value):
    env = dict(os.environ, RAAD_KEEP_FREED_MEMORY=env_value)
    res = subprocess.run([sys.executable, "-c", LOOP], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_freed_blocks_are_reused_without_page_faults():
    off, on = _loop("0"), _loop("1")
    assert off["status"].startswith("off by RAAD_KEEP_FREED_MEMORY=0")
    if not on["status"].startswith("glibc: freed blocks up to"):
        pytest.skip(f"not in effect here: {on['status']}")
    pages = 8 * 96 * 128 * 128 * 4 // 4096      # one activation, in 4 KiB pages
    if min(off["faults"][3:]) < pages // 2:
        pytest.skip(f"the default allocator does not fault here ({off['faults']}): nothing to save")
    # after warm-up, some iterations run on kept blocks alone (fragmentation may add a few faults)
    assert min(on["faults"][3:]) < pages // 20, on["faults"]


def test_bad_limit_is_refused():
    with pytest.raises(ValueError, match="limit must be a positive number of bytes"):
        keep_freed_memory(0)

"""The router process's collector tuning (router.main.tune_collector) still
collects cyclic garbage, and within a bounded number of allocations."""

import subprocess
import sys

PROBE = """
import gc, weakref
from router import main
main.tune_collector()
assert gc.get_threshold()[0] == main.GC_YOUNG, gc.get_threshold()
assert gc.get_freeze_count() > 0

class Node:
    pass

collected = []
def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a          # freed by the collector only
    weakref.finalize(a, collected.append, 1)

# garbage made without end stays bounded: collected as it grows
outstanding = 0
for made in range(1, 20001):
    cycle()
    outstanding = max(outstanding, made - len(collected))
print(len(collected), outstanding)
"""


def test_cyclic_garbage_stays_bounded_after_tuning():
    out = subprocess.run([sys.executable, "-c", PROBE], check=True, text=True,
                         capture_output=True, timeout=60).stdout.split()
    collected, outstanding = int(out[0]), int(out[1])
    # each cycle is several tracked objects: fewer than GC_YOUNG cycles wait
    assert outstanding < 7000
    assert collected > 20000 - 7000

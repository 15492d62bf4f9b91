"""`python -m tests.bench` (tox -e bench): every benchmark, one after the other.

`python -m tests.bench storm [--hosts N --instances M ...]`: the boot storm
alone (tests/bench/bench_storm.py; a few minutes, not in the default run).

`python -m tests.bench cluster [--events N --recoveries K]`: the 3-node quorum
cluster against the single broker, and recovery after kill -9 of the
connected node (tests/bench/bench_cluster.py; starts and stops the cluster of
tests/cluster, a few minutes, not in the default run).

`python -m tests.bench sustained [--hosts N --rate R --duration S ...]`:
a steady event rate over many live hosts, against the oslo.messaging
reference (tests/bench/bench_sustained.py; a few minutes, not in the
default run).
"""

import sys

from tests.bench import bench_router, bench_tls, bench_waiters

if __name__ == "__main__":
    if sys.argv[1:2] == ["cluster"]:
        from tests.bench import bench_cluster
        sys.exit(bench_cluster.main(sys.argv[2:]))
    if sys.argv[1:2] == ["storm"]:
        from tests.bench import bench_storm
        sys.exit(bench_storm.main(sys.argv[2:]))
    if sys.argv[1:2] == ["sustained"]:
        from tests.bench import bench_sustained
        sys.exit(bench_sustained.main(sys.argv[2:]))
    code = bench_router.main(sys.argv[1:])
    print()
    code = code or bench_waiters.main([])
    print()
    sys.exit(code or bench_tls.main([]))

"""`python -m tests.bench` (tox -e bench): every benchmark, one after the other.

`python -m tests.bench storm [--hosts N --instances M ...]`: the boot storm
alone (tests/bench/bench_storm.py; a few minutes, not in the default run).
"""

import sys

from tests.bench import bench_router, bench_tls, bench_waiters

if __name__ == "__main__":
    if sys.argv[1:2] == ["storm"]:
        from tests.bench import bench_storm
        sys.exit(bench_storm.main(sys.argv[2:]))
    code = bench_router.main(sys.argv[1:])
    print()
    code = code or bench_waiters.main([])
    print()
    sys.exit(code or bench_tls.main([]))

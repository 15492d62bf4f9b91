"""`python -m tests.bench` (tox -e bench): every benchmark, one after the other."""

import sys

from tests.bench import bench_router, bench_tls, bench_waiters

if __name__ == "__main__":
    code = bench_router.main(sys.argv[1:])
    print()
    code = code or bench_waiters.main([])
    print()
    sys.exit(code or bench_tls.main([]))

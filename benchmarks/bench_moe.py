"""Dense vs MoE speed side by side; same as `moee bench` (see moee/bench_suite.py)."""

from moee.bench_suite import main

if __name__ == "__main__":
    main()

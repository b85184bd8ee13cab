"""Dense vs MoE speed side by side; same as `moee bench` (see src/moee/bench/suite.py)."""

from moee.bench.suite import main

if __name__ == "__main__":
    main()

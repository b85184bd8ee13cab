"""The benchmark harness (`moee bench`): dense vs MoE speed and memory, side by side in one run.
The core library never imports this package."""

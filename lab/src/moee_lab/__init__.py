"""moee-lab: what moee's repository runs on top of the library — the embedded default ViT and
its Fashion-MNIST demo (`moee demo`, `moee train-base`), the paper's study (`moee study`),
the dense-vs-MoE speed harness (`moee bench`) and the checkpoint report (`moee analyze`).
A separate distribution: installing moee does not install it, and `import moee` never loads
it; it adds its commands to `moee` through entry points (moee_lab.cli)."""

"""Checkpoints: safetensors + JSON (`io`), their digests (`integrity`), the source model's
fingerprint, and the files that let transformers run a checkpoint without moee
(`remote_code` writes them; `modeling_moee` is the template, importing nothing of moee)."""

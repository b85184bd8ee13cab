"""Distillation from the dense teacher (`distill`), its settings (`training_config`) and its
resumable state on disk (`training_state`)."""

"""What the stages share and that is not itself moee's method: batches, text and image-folder
data, atomic writes, on-disk arrays, cache keys, validation, modes, resources and disk space,
torchrun helpers."""

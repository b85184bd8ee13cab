"""Record every MLP block's input and post-activation hidden vector per token, to disk.

All layers are recorded in one pass over the data; each layer streams into its own .npy
memmap, so memory stays bounded by one batch whatever `n_tokens` is. `store.json` says what
the store came from (model and data digests, record settings), so a rerun reuses it only when
all of them still match. Padding tokens (attention_mask == 0) are not recorded.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from moee.adapters import MLPSite, entry_input
from moee.config import RecordConfig
from moee.errors import AdapterMismatchError, EmptyDataError, NonFiniteError
from moee.util.atomic import write_json
from moee.util.batches import call_model, check_batch, token_mask
from moee.util.cache_key import stage_key
from moee.util.fingerprint import new_digest, update_batch_digest
from moee.util.stored_array import RowWriter, StoredArray

STORE_META = "store.json"


@dataclass
class ActivationStore:
    """Per-layer on-disk arrays: layer_{i}.input.npy (N, d) and layer_{i}.hidden.npy (N, H)."""

    root: Path
    site_names: list[str]
    n_tokens: int
    origin: dict[str, Any]  # model / data digests, record settings, batches consumed

    def hidden(self, layer: int) -> StoredArray:
        return StoredArray(self.root / f"layer_{layer}.hidden.npy", self.n_tokens)

    def inputs(self, layer: int) -> StoredArray:
        return StoredArray(self.root / f"layer_{layer}.input.npy", self.n_tokens)

    @classmethod
    def open(cls, root: str | Path) -> ActivationStore:
        meta = json.loads((Path(root) / STORE_META).read_text())
        return cls(Path(root), meta["site_names"], meta["n_tokens"], meta.get("origin", {}))


def reuse_or_why_not(root: Path, sites: list[MLPSite], config: RecordConfig, model_digest: str,
                     data: Iterable) -> tuple[ActivationStore | None, str, Iterable]:
    """The store in `root` if it was recorded from this model, these sites and settings, and
    the same leading batches of `data`; else None and why. Returns the data to record from
    (batches read for the check are put back in front)."""
    if not (root / STORE_META).is_file():
        return None, "no recorded activations yet", data
    try:
        store = ActivationStore.open(root)
    except (json.JSONDecodeError, KeyError, OSError):
        return None, f"{root / STORE_META} is unreadable", data
    origin = store.origin
    if store.site_names != [s.name for s in sites]:
        return None, "the model's MLP blocks differ", data
    if origin.get("model") != model_digest:
        return None, "the model's weights changed", data
    if origin.get("key") != store_key(model_digest, store.site_names, config):
        return None, "the record settings changed", data
    it: Iterator = iter(data)
    head = list(itertools.islice(it, origin.get("batches", 0)))
    digest = new_digest()
    for batch in head:
        update_batch_digest(digest, batch)
    data = itertools.chain(head, it)
    if len(head) < origin.get("batches", 0) or digest.hexdigest() != origin.get("data"):
        return None, "the calibration data changed", data
    return store, "same model, data and settings", data


def settings_of(config: RecordConfig) -> dict[str, Any]:
    return {"n_tokens": config.n_tokens, "dtype": config.dtype}


def store_key(model_digest: str | None, site_names: list[str], config: RecordConfig) -> str:
    """The key of an activation store: the model and its MLP blocks, under the record settings
    (the data is checked apart, by its digest, as it is read)."""
    return stage_key("record", {"model": model_digest, "sites": site_names}, {"record": config})


def _check_finite(site: str, x: torch.Tensor, hidden: torch.Tensor, limit: float,
                  batch: int) -> None:
    for name, t in (("input", x), ("hidden activations", hidden)):
        peak = float(t.detach().abs().max()) if t.numel() else 0.0
        if not math.isfinite(peak):
            raise NonFiniteError(f"layer {site}: NaN or Inf in the MLP's {name} on calibration "
                                 f"batch {batch}: the model produces them on this data")
        if peak > limit:
            raise NonFiniteError(
                f"layer {site}: an MLP {name} value of {peak:.3g} on calibration batch {batch} "
                f"exceeds the activation store's range ({limit:.3g}): record with "
                "RecordConfig(dtype='float32') (CLI: --store-dtype float32)")


class _Recorder:
    """What the sites' forward pre-hooks share: each site's row writers, the rows each holds,
    the current batch's real-token mask and its index."""

    def __init__(self, root: Path, n_sites: int, n: int, dtype: np.dtype) -> None:
        self.root, self.n, self.dtype = root, n, dtype
        self.limit = float(np.finfo(dtype).max)  # beyond it a value would be stored as Inf
        self.arrays: dict[int, tuple[RowWriter, RowWriter]] = {}
        self.filled = [0] * n_sites
        self.mask: torch.Tensor | None = None
        self.batches = 0

    def hook(self, i: int, site: MLPSite):
        weights = site.weights()

        def hook(_module, args, kwargs):
            x = entry_input(args, kwargs)
            if min(self.n - self.filled[i], x.numel() // x.shape[-1]) <= 0:
                return
            hidden = weights.hidden(x, site.activation)  # as the block computes it
            _check_finite(site.name, x, hidden, self.limit, self.batches - 1)
            m = self.mask
            if m is not None and tuple(x.shape[:2]) == tuple(m.shape):
                x, hidden = x[m], hidden[m]  # real tokens only
            self._write(i, x.reshape(-1, x.shape[-1]), hidden.reshape(-1, hidden.shape[-1]))

        return hook

    def _write(self, i: int, x: torch.Tensor, hidden: torch.Tensor) -> None:
        start = self.filled[i]
        take = min(self.n - start, x.shape[0])
        if i not in self.arrays:
            self.arrays[i] = (
                RowWriter(self.root / f"layer_{i}.input.npy", self.dtype, (self.n, x.shape[-1])),
                RowWriter(self.root / f"layer_{i}.hidden.npy", self.dtype,
                          (self.n, hidden.shape[-1])))
        self.arrays[i][0].write(start, x[:take].float().cpu().numpy())
        self.arrays[i][1].write(start, hidden[:take].float().cpu().numpy())
        self.filled[i] = start + take

    def check_every_site_ran(self, sites: list[MLPSite]) -> int:
        """The tokens recorded at every site; an error when a site or the data gave none."""
        silent = [s.name for s, f in zip(sites, self.filled, strict=True) if f == 0]
        if self.batches and silent:
            raise AdapterMismatchError(
                f"{len(silent)} MLP block(s) never ran in {self.batches} batch(es) of the "
                f"model's forward ({', '.join(silent[:3])}): the adapter points at modules the "
                "model does not call")
        got = min(self.filled) if self.filled else 0
        if got == 0:
            raise EmptyDataError("The calibration data yielded no tokens: pass at least one "
                                 "batch.")
        return got

    def close(self) -> None:
        for inp, hid in self.arrays.values():
            inp.close()
            hid.close()

    def discard(self) -> None:
        for pair in self.arrays.values():
            for writer in pair:
                writer.discard()


@torch.inference_mode()
def record_activations(
    model: nn.Module,
    sites: list[MLPSite],
    data: Iterable,
    config: RecordConfig,
    store_dir: str | Path,
    progress: bool = True,
    model_digest: str | None = None,
) -> ActivationStore:
    """Run `data` (tensors, (x, y) pairs or kwargs dicts) through `model` until
    `config.n_tokens` tokens have been seen; write every site's (input, hidden) rows."""
    root = Path(store_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / STORE_META).unlink(missing_ok=True)  # no old description beside new arrays
    n = config.n_tokens
    rec = _Recorder(root, len(sites), n, np.dtype(config.dtype))
    handles = [s.entry.register_forward_pre_hook(rec.hook(i, s), with_kwargs=True)
               for i, s in enumerate(sites)]
    was_training = model.training
    model.eval()
    digest = new_digest()
    bar = tqdm(total=n, desc="record tokens", unit="tok", disable=not progress, leave=False)
    try:
        for batch in data:
            check_batch(batch, rec.batches)
            update_batch_digest(digest, batch)
            rec.batches += 1
            before = rec.filled[0]
            rec.mask = token_mask(batch)
            call_model(model, batch)
            bar.update(rec.filled[0] - before)
            if min(rec.filled) >= n:
                break
        got = rec.check_every_site_ran(sites)
        rec.close()
    except BaseException:
        rec.discard()
        raise
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        bar.close()
    names = [s.name for s in sites]
    origin = {"model": model_digest, "data": digest.hexdigest(), "batches": rec.batches,
              "settings": settings_of(config), "key": store_key(model_digest, names, config)}
    # Written last, atomically: it vouches for the arrays beside it.
    write_json(root / STORE_META, {"site_names": names, "n_tokens": got,
                                   "dtype": config.dtype, "origin": origin})
    return ActivationStore(root, names, got, origin)


def merge_stores(shards: list[Path], out: Path) -> ActivationStore:
    """One store holding the shards' tokens in rank order, copied layer by layer in chunks
    (memory stays a chunk); reused when it was merged from shards of the same origins."""
    stores = [ActivationStore.open(s) for s in shards]
    origin: dict[str, Any] = {
        "shards": [s.origin for s in stores],
        "data": hashlib.sha256(json.dumps([s.origin for s in stores],
                                          sort_keys=True).encode()).hexdigest(),
        "model": stores[0].origin.get("model"), "settings": stores[0].origin.get("settings")}
    if (out / STORE_META).is_file() and ActivationStore.open(out).origin == origin:
        return ActivationStore.open(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / STORE_META).unlink(missing_ok=True)
    total = sum(s.n_tokens for s in stores)
    for layer in range(len(stores[0].site_names)):
        for kind, read in (("input", ActivationStore.inputs), ("hidden", ActivationStore.hidden)):
            first = read(stores[0], layer)
            merged = RowWriter(out / f"layer_{layer}.{kind}.npy", first.dtype,
                               (total, first.shape[1]))
            start = 0
            for s in stores:
                part = read(s, layer)
                for c in range(0, len(part), 65536):
                    merged.write(start + c, part[c : c + 65536])
                start += len(part)
            merged.close()
    write_json(out / STORE_META, {"site_names": stores[0].site_names, "n_tokens": total,
                                  "dtype": str(first.dtype), "origin": origin})
    return ActivationStore.open(out)

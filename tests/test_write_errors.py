"""A write that fails under a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored: what a full
disk looks like to the writer) is one `WriteError` naming the file, whichever library wrote it
(safetensors, gguf-py, numpy, moee's own store), and leaves no file under the final name."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("resource")

SCRIPT = textwrap.dedent("""
    import json, resource, signal, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    out = Path(sys.argv[2])
    import numpy as np, torch
    import moee
    from conftest import tiny_moe_model
    from test_export_gguf import small_vocab_source, tiny_llama
    from moee.export import export
    from moee.util.atomic import save_npy
    from moee.util.stored_array import RowWriter

    source = small_vocab_source(out / "source.gguf", 64)  # written before the limit
    llama = moee.MoEModel(tiny_llama(64))
    vit = tiny_moe_model()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    cases = {
        "checkpoint": lambda: vit.save_pretrained(out / "ckpt"),
        "mixtral": lambda: export(llama, out / "mix", to="mixtral"),
        "gguf": lambda: export(llama, out / "m.gguf", to="gguf", gguf_metadata=source),
        "store": lambda: RowWriter(out / "layer_0.hidden.npy", np.float32, (10000, 16)),
        "npy": lambda: save_npy(out / "labels.npy", np.zeros(10000)),
    }
    result = {}
    for name, write in cases.items():
        try:
            write()
            result[name] = ["no error", ""]
        except Exception as e:
            result[name] = [type(e).__name__, str(e)]
    print(json.dumps(result))
""")


def test_a_file_size_limit_is_one_named_error_and_leaves_nothing(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(Path(__file__).parent),
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    named = {"checkpoint": "model.safetensors", "mixtral": "model.safetensors",
             "gguf": "m.gguf", "store": "layer_0.hidden.npy", "npy": "labels.npy"}
    for case, file in named.items():
        kind, message = result[case]
        assert kind == "WriteError", (case, kind, message)
        assert file in message and "\n" not in message, message
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert left == ["ckpt", "source.gguf"], left  # the checkpoint's folder, empty

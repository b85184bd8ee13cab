"""The CLI's commands, each thin over the Python API."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from moee.cli.checks import check_perplexity_rows, note_short_batch, warn_top_k
from moee.cli.options import distill_config, extract_config
from moee.cli.outputs import STATE_DIR
from moee.cli.plugins import embedded_default
from moee.cli.provenance import check_source, record_source, recorded_source
from moee.cli.sources import (
    calibration_data,
    check_pair,
    check_seq_len,
    load_dense,
    training_data,
    user_batches,
)
from moee.errors import ConfigError
from moee.util.atomic import replacing_dir
from moee.util.distributed import rank_and_world
from moee.util.fingerprint import model_fingerprint


def cmd_extract(args: argparse.Namespace) -> int:
    from moee.api import extract

    dense, tokenizer = load_dense(args.model)
    check_seq_len(args, dense)
    fingerprint = model_fingerprint(dense)  # recorded: a later change of the model is noticed
    config = extract_config(args)
    moe_model, report = extract(dense, calibration_data(args, tokenizer), config)
    if rank_and_world()[0] != 0:  # torchrun: rank 0 reports and saves
        return 0
    print(f"Extracted in {report.seconds:.0f} s from {report.n_tokens} tokens:\n{report.table()}")
    warn_top_k(config, report.layers)
    with replacing_dir(args.out) as out:  # an earlier checkpoint there stays whole until then
        moe_model.save_pretrained(out)
        (out / "extraction_report.json").write_text(json.dumps(report.as_dict(), indent=1))
        record_source(out, args.model, fingerprint)
    print(f"Saved MoE checkpoint to {args.out}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from moee.moe_model import MoEModel
    from moee.training.distill import distill

    student = MoEModel.from_pretrained(args.checkpoint, verify=not args.no_verify)
    source = recorded_source(args.checkpoint, args.teacher)
    teacher, tokenizer = load_dense(source)
    check_seq_len(args, teacher)
    check_pair(student, teacher, "teacher")
    fingerprint = check_source(args.checkpoint, "teacher", args.teacher, source, teacher)
    # The run's state lives in the output folder until the checkpoint replaces it: rerunning
    # the same command after an interruption resumes it.
    losses = distill(student, teacher, training_data(args, tokenizer), distill_config(args),
                     state_dir=Path(args.out) / STATE_DIR, save_every=args.save_every)
    if rank_and_world()[0] != 0:  # torchrun: rank 0 reports and saves
        return 0
    print(f"KD fine-tune: {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    with replacing_dir(args.out) as out:  # the state goes with the folder it replaces
        student.cpu().save_pretrained(out)
        record_source(out, source, fingerprint)
    print(f"Saved fine-tuned MoE checkpoint to {args.out}")
    return 0


def _evaluate_on_data(args: argparse.Namespace) -> int:
    """Dense vs MoE on the user's text files or image folder (no labels): fidelity of the MoE
    to the dense model, perplexity for causal LMs, MACs, parameters and latency."""
    import itertools

    from moee.evaluate import count_macs, count_params, latency_ms
    from moee.fidelity import fidelity
    from moee.moe_model import MoEModel

    moe_model = MoEModel.from_pretrained(args.checkpoint, verify=not args.no_verify)
    source = recorded_source(args.checkpoint, args.dense)
    dense, preprocessor = load_dense(source)
    check_seq_len(args, dense)
    check_perplexity_rows(args, dense)
    check_pair(moe_model, dense, "dense model")
    check_source(args.checkpoint, "dense", args.dense, source, dense)
    batches = list(itertools.islice(user_batches(args, preprocessor, None), args.max_batches))
    result = fidelity(moe_model, dense, batches)
    for name, model in (("dense", dense), ("moe", moe_model)):
        result[f"{name}_macs"] = count_macs(model, batches[0])
        result[f"{name}_executed_macs"] = count_macs(model, batches[0], executed=True)
        result[f"{name}_params"] = count_params(model)
    result.update({f"{k}_latency_ms": v for k, v in
                   latency_ms({"dense": dense, "moe": moe_model}, batches[0]).items()})
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else
              f"{key:<{width}}  {value:,}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"Results JSON: {args.json}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.data:
        return _evaluate_on_data(args)
    from moee.moe_model import MoEModel

    default = embedded_default()  # says how to get it, before any model loads
    moe_model = MoEModel.from_pretrained(args.checkpoint, verify=not args.no_verify)
    source = recorded_source(args.checkpoint, args.dense)
    dense = load_dense(source)[0]
    check_pair(moe_model, dense, "dense model")
    check_source(args.checkpoint, "dense", args.dense, source, dense)
    return default.evaluate(args, moe_model, dense)


def _calibration_batch(args: argparse.Namespace, moe_model):
    """One batch of the size the user will serve: --batch rows of --data (text tokenized by
    the checkpoint's source model's tokenizer, or images), else the embedded default's."""
    if args.data:
        preprocessor = load_dense(recorded_source(args.checkpoint, None))[1]
        batches = user_batches(args, preprocessor, None, batch_size=args.batch)
        if isinstance(batches, list):  # text: rows of --seq-len tokens, --batch of them
            ids = torch.cat([b["input_ids"] for b in batches])[: args.batch]
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return next(iter(batches))
    return embedded_default().calibration_batch(args, moe_model)


def _first_output(model, batch) -> torch.Tensor:
    """The model's main output (logits or hidden states) on one batch."""
    from moee.util.batches import call_model, output_tensor

    with torch.inference_mode():
        return output_tensor(call_model(model, batch)).float()


def cmd_calibrate(args: argparse.Namespace) -> int:
    from moee.api import calibrate
    from moee.moe_model import MoEModel

    moe_model = MoEModel.from_pretrained(args.checkpoint, verify=not args.no_verify)
    if args.force:
        moe_model.configure(execution=args.force)
        print(f"every MoE layer set to execution={args.force!r}")
    else:
        images = _calibration_batch(args, moe_model)
        note_short_batch(args.batch, images)
        before = _first_output(moe_model, images)
        rows = calibrate(moe_model, images, allow_approximate=args.allow_approximate)
        print(f"{'layer':<22}{'tokens':>7}{'experts ms':>12}{'union ms':>10}{'kept':>9}"
              f"{'masked up to':>14}")
        for r in rows:
            print(f"{r['site']:<22}{r['tokens']:>7}{r['experts_ms']:>12.3f}{r['union_ms']:>10.3f}"
                  f"{r['execution']:>9}{r['small_batch_tokens']:>11} tok")
        if any(r["execution"] == "union" for r in rows):
            after = _first_output(moe_model, images)
            agree = (after.argmax(-1) == before.argmax(-1)).float().mean()
            print(f"moee: union layers change the outputs on the calibration batch: argmax "
                  f"agreement {agree:.2%}, max |change| {(after - before).abs().max():.3g}")
    with replacing_dir(args.out) as out:
        moe_model.save_pretrained(out)
    print(f"Saved to {args.out}")
    return 0


def _tokenizer_of(source: str, given: bool):
    """The tokenizer of the dense model `source` (a .gguf file, a folder or a hub id), or None
    with a note when it has none; refused when it was `given` with --tokenizer."""
    import transformers

    try:
        if source.endswith(".gguf"):
            path = Path(source)
            return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if given:
            raise ConfigError(f"tokenizer: no tokenizer could be loaded from {source!r} "
                              f"({why}); give the folder of the model's tokenizer") from None
        print(f"moee: no tokenizer from {source!r} ({why}); exporting the model without one "
              "(give --tokenizer)")
        return None


def check_vocabulary(tokenizer, model, source: str) -> None:
    """Refuse a tokenizer of another size than the model's embedding: its ids would index
    other rows, or none. Fewer tokens than rows pass where the rows are a multiple of 64, the
    padding many models' embeddings have (Phi-3, Qwen2)."""
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if embeddings is None:
        return
    rows = embeddings.weight.shape[0]
    tokens = len(tokenizer)
    if tokens == rows or tokens < rows and rows % 64 == 0:
        return
    raise ConfigError(f"tokenizer: {source!r} has a vocabulary of {tokens} tokens, but the "
                      f"model's embedding has {rows} rows: give the tokenizer of the model the "
                      "checkpoint was extracted from (--tokenizer)")


def cmd_export(args: argparse.Namespace) -> int:
    import moee
    from moee.export import export

    moe_model = moee.load(args.checkpoint, verify=not args.no_verify)
    out = Path(args.out)
    if args.to == "onnx":
        return _export_onnx(moe_model, out, args)
    source = recorded_source(args.checkpoint, args.tokenizer)
    if args.to == "gguf":
        metadata = args.gguf_metadata or (source if source.endswith(".gguf") else None)
        if metadata is None:
            raise ConfigError("gguf-metadata: give a GGUF of the source model (its vocabulary "
                              "is copied), or export --to mixtral and convert that directory "
                              "with llama.cpp's convert_hf_to_gguf.py")
        result = export(moe_model, out, to="gguf", gguf_metadata=metadata,
                        gguf_type=args.gguf_type or "f32", announce=_announce)
        how = "llama.cpp (llama-cli -m FILE, or any llama.cpp binding)"
    else:
        tokenizer = (None if source == "default"
                     else _tokenizer_of(source, given=args.tokenizer is not None))
        if tokenizer is not None:
            check_vocabulary(tokenizer, moe_model.model, source)
        dtype = getattr(torch, args.dtype) if args.dtype else None
        result = export(moe_model, out, to="mixtral", tokenizer=tokenizer, dtype=dtype,
                        announce=_announce)
        how = "transformers.MixtralForCausalLM.from_pretrained, vLLM"
    print(f"moee: {result.padding_summary()}")
    print(f"Exported to {out} (load with {how})")
    return 0


def _announce(line: str) -> None:
    print(f"moee: {line}", flush=True)


def _export_onnx(moe_model, out: Path, args: argparse.Namespace) -> int:
    """`moee export --to onnx`: the file, its check against moee, then int8 if asked."""
    from moee.export.onnx import export_onnx
    from moee.export.onnx_int8 import quantize_int8

    if args.graph:
        moe_model.configure(execution="masked" if args.graph == "masked" else "experts")
    result = export_onnx(moe_model, out, announce=_announce)
    checked = ("unchecked (no onnxruntime)" if result.max_error is None
               else f"max |ONNX Runtime - moee| {result.max_error:.2g} at batch 1 and 3")
    print(f"moee: {result.moe_layers} MoE layers, routing inside the graph; inputs "
          f"{result.inputs}, outputs {result.outputs}; {checked}")
    if args.quantize == "int8":
        routers = quantize_int8(out, out)
        print(f"moee: int8 weights (ONNX Runtime dynamic quantization), {len(routers)} routers "
              f"kept in fp32; {out.stat().st_size / 2**20:,.1f} MiB")
    print(f"Exported to {out} (load with onnxruntime.InferenceSession or "
          "openvino.Core().compile_model)")
    return 0

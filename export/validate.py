"""Validation at the end of every export: ONNX checker, ATC op check, each graph in ONNX Runtime (CPU EP) against
the PyTorch model on the same inputs, the routing decisions, then a whole greedy generation through the graphs that
must give the PyTorch tokens. Errors are max |ORT - PyTorch| absolute and relative to max(1, max |PyTorch|); the
bound is moevl.export.graph.TOLERANCE[dtype] on the relative error. One procedure for every family: what the graphs
must reproduce comes from the family's GraphIO.reference."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class ValidationError(RuntimeError):
    pass


def greedy_tokens(session, batch, n: int) -> list[list[int]]:
    """n greedy tokens per request through any prefill/decode session (no stopping: every step is compared)."""
    logits = session.prefill(batch, batch.input_ids.shape[1] + n)
    out = []
    for i in range(n):
        tok = logits.float().argmax(-1)
        out.append(tok)
        if i < n - 1:
            logits = session.decode(tok)
    return torch.stack(out, 1).tolist()


def sample_batch(session):
    """Two requests of different lengths: one with the demo image and one text-only (the processor's), or, for a
    model without a tokenizer (the benchmarks' random models), the family's synthetic text-only batch."""
    if getattr(session, "processor", None) is not None and session.processor.tokenizer is not None:
        from moevl.model.tiny import DEMO_IMAGE

        return session.prepare(["Describe the image.", "What colour is the circle? Answer in one word."],
                               [[str(DEMO_IMAGE)], []])
    from moevl.export.graph import builders_of

    return builders_of(session.family).GraphIO.synthetic_batch(session.model.cfg)


def _errors(name, ort_value, ref, tol, log, report):
    ref = ref.detach().float().cpu()
    got = torch.from_numpy(np.asarray(ort_value)).float()
    if got.shape != ref.shape:
        raise ValidationError(f"{name}: ONNX Runtime shape {tuple(got.shape)} != PyTorch {tuple(ref.shape)}")
    abs_err = (got - ref).abs().max().item() if ref.numel() else 0.0
    rel_err = abs_err / max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    log(f"  {name:<24} max abs err {abs_err:.3g}  rel {rel_err:.3g}  (bound {tol:g})")
    report[name] = {"max_abs": abs_err, "max_rel": rel_err}
    if not rel_err <= tol:
        raise ValidationError(f"{name}: ONNX Runtime differs from PyTorch by {rel_err:.3g} (relative) > {tol:g}")


def _choices(session) -> list[dict]:
    """The experts each router chose (probabilities and shares left out: their last fp16 bit may differ within the
    bound)."""
    return [{k: v for k, v in d.to_dict().items() if k not in ("p", "share")} for d in session.routing_decisions()]


@torch.inference_mode()
def validate_export(folder: Path, session, tokens: int = 8, log=print) -> dict:
    import onnx

    from moevl.export.check import check_onnx_dir
    from moevl.export.graph import TOLERANCE, read_contract
    from moevl.export.session import open_ort

    folder = Path(folder)
    contract = read_contract(folder)
    tol = TOLERANCE[contract["dtype"]]
    for g in contract["graphs"].values():
        onnx.checker.check_model(str(folder / g["file"]))  # by path: works with external data
    log("onnx.checker: OK")
    check = check_onnx_dir(folder)
    if not check.ok:
        raise ValidationError("ATC op check failed:\n  " + "\n  ".join(check.problems))
    log("ATC op check: OK")
    report = {"tolerance_rel": tol, "graphs": {}}
    errs = report["graphs"]
    ort = open_ort(folder)
    io = ort.io
    batch = sample_batch(session)
    want = io.reference(session, batch)
    feats = np.zeros((0, io.cfg.hidden_size), io.np_dtype)
    if "image_features" in want and "vision" in contract["graphs"]:
        feats = ort.runner.vision(io.vision_feeds(batch))
        _errors("vision.image_features", feats, want["image_features"], tol, log, errs)
        feats = want["image_features"].numpy().astype(io.np_dtype)  # the embedding graph gets PyTorch's features
    got = ort.runner.embedding({**io.embedding_feeds(batch), "image_features": feats})
    for name, value in got.items():
        _errors(f"embedding.{name}", value, want[name], tol, log, errs)
    ref = session.prefill(batch, batch.input_ids.shape[1] + 2)
    _errors("decoder.prefill_logits", ort.prefill(batch, 0), ref, tol, log, errs)
    want_routing, have_routing = _choices(session), _choices(ort)
    report[io.routing_report_key] = want_routing == have_routing
    if want_routing != have_routing:
        if contract["dtype"] == "fp32" or not io.near_ties_in_fp16:
            raise ValidationError(f"routing decisions differ: PyTorch {want_routing} vs ONNX Runtime {have_routing}")
        # a near-tie flipped by fp16 rounding; the logit bound and the tokens still decide
        log(f"  routing decisions differ on near-ties: PyTorch {want_routing} vs ONNX Runtime {have_routing}")
    elif want_routing:
        log("  routing decisions: equal")
    tok = ref.argmax(-1)
    _errors("decoder.decode_logits", ort.decode(tok), session.decode(tok), tol, log, errs)
    want_tokens, got_tokens = greedy_tokens(session, batch, tokens), greedy_tokens(ort, batch, tokens)
    report["greedy"] = {"tokens": tokens, "batch": batch.batch_size, "equal": want_tokens == got_tokens}
    if want_tokens != got_tokens:
        raise ValidationError(f"greedy generation differs: PyTorch {want_tokens} vs ONNX Runtime {got_tokens}")
    log(f"  greedy generation ({batch.batch_size} requests x {tokens} tokens): equal to PyTorch")
    return report

"""Validation at the end of every export: ONNX checker, ATC op check, each graph in ONNX Runtime (CPU EP) against
the PyTorch model on the same inputs, then a whole greedy generation through the graphs that must give the
PyTorch tokens. Errors are max |ORT - PyTorch| absolute and relative to max(1, max |PyTorch|); the bound is
export.onnx_export.TOLERANCE[dtype] on the relative error."""
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
    """Two requests of different lengths: one with the demo image and one text-only (the processor's), or a
    synthetic text-only chat of token ids when the model has no tokenizer."""
    from model.inputs import collate

    cfg = session.model.cfg
    if getattr(session, "processor", None) is not None and session.processor.tokenizer is not None:
        from model.tiny import DEMO_IMAGE

        return session.prepare(["Describe the image.", "What colour is the circle? Answer in one word."],
                               [[str(DEMO_IMAGE)], []])
    g = torch.Generator().manual_seed(0)
    lo, hi = 10, min(cfg.vocab_size, 150000)

    def chat(n):
        words = torch.randint(lo, hi, (n + 4,), generator=g).tolist()
        return ([cfg.im_start_token_id, words[0], cfg.im_end_token_id, cfg.im_start_token_id, words[1]]
                + words[4:] + [cfg.im_end_token_id, cfg.im_start_token_id, words[2]])

    return collate([chat(12), chat(7)], [], [], cfg)


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


@torch.inference_mode()
def validate_export(folder: Path, session, tokens: int = 8, log=print) -> dict:
    import onnx

    from export.check import check_onnx_dir
    from export.onnx_export import TOLERANCE, read_contract
    from export.runtime import OrtAwakerSession
    from model.inputs import pooled_prompt

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
    if contract["family"] == "moe-llava":
        from export.moe_llava_onnx import validate_moe_llava

        return validate_moe_llava(folder, session, tokens=tokens, log=log)
    report = {"tolerance_rel": tol, "graphs": {}}
    ort = OrtAwakerSession(folder)
    m = session.model
    batch = sample_batch(session)
    errs = report["graphs"]
    feats = None
    h = m.cfg.hidden_size
    if batch.patches is not None and ort.vision is not None:
        feats = m.encode_images(batch.patches, batch.vision_pos, batch.vision_keep)
        got = ort._vision(batch.patches.numpy().astype(np.float32), batch.vision_pos.numpy(),
                          batch.vision_keep.numpy())
        _errors("vision.image_features", got, feats, tol, log, errs)
    emb = m.embed(batch.input_ids, feats, batch.image_mask)
    ort_feats = (feats.numpy() if feats is not None else np.zeros((0, h))).astype(ort.np_dtype)
    got_emb, got_router = ort._embedding(batch.input_ids.numpy(), ort_feats, batch.image_mask.numpy(),
                                         batch.span.numpy())
    _errors("embedding.inputs_embeds", got_emb, emb, tol, log, errs)
    _errors("embedding.router_input", got_router, pooled_prompt(emb, batch.span), tol, log, errs)
    ref = session.prefill(batch, batch.input_ids.shape[1] + 2)
    _errors("decoder.prefill_logits", ort.prefill(batch, 0), ref, tol, log, errs)
    if session.last_routing is not None and session.last_routing[0] is not None:
        want = np.array([[r.attn_expert.tolist(), r.mlp_expert.tolist()] for r in session.last_routing])
        if not np.array_equal(want, ort.last_routing[0]):
            raise ValidationError(f"router decisions differ: PyTorch {want.tolist()} vs ONNX Runtime "
                                  f"{ort.last_routing[0].tolist()}")
        log("  router decisions: equal")
    return check_decode_and_greedy(session, ort, batch, ref, tokens, tol, log, errs, report)


def check_decode_and_greedy(session, ort, batch, prefill_ref, tokens, tol, log, errs, report) -> dict:
    """The end of every family's validation: one decode step's logits within the bound, then a whole greedy
    generation through the graphs equal to PyTorch's."""
    tok = prefill_ref.argmax(-1)
    _errors("decoder.decode_logits", ort.decode(tok), session.decode(tok), tol, log, errs)
    want, got = greedy_tokens(session, batch, tokens), greedy_tokens(ort, batch, tokens)
    report["greedy"] = {"tokens": tokens, "batch": batch.batch_size, "equal": want == got}
    if want != got:
        raise ValidationError(f"greedy generation differs: PyTorch {want} vs ONNX Runtime {got}")
    log(f"  greedy generation ({batch.batch_size} requests x {tokens} tokens): equal to PyTorch")
    return report

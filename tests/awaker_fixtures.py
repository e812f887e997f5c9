"""Tiny Qwen2-VL / Awaker checkpoints built in the tests from random weights (no hub)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from moevl.model.awaker.tiny import TINY_TOKENIZER

EXPERT_NAMES = ["0", "1", "2", "3", "g"]
RANK, ALPHA = 4, 8.0
SCALING = ALPHA / RANK


def tiny_hf_config():
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config=dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                         max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=64, patch_size=14,
                           temporal_patch_size=2, spatial_merge_size=2, in_channels=3),
        image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4,
        eos_token_id=2, pad_token_id=0, bos_token_id=0, tie_word_embeddings=False,
    )


def tiny_hf_model(seed=0):
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = tiny_hf_config()
    cfg._attn_implementation = "eager"
    m = Qwen2VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # make every weight matter (default init leaves biases/norms trivial)
        for name, p in m.named_parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


def write_hf_folder(model, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    for f in TINY_TOKENIZER.iterdir():
        shutil.copy2(f, folder / f.name)
    return folder


def release_base_keys(model) -> dict[str, torch.Tensor]:
    """transformers 5.x state dict -> the 4.45 names the Awaker release uses, under base_model.model."""
    out = {}
    for k, v in model.state_dict().items():
        k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        out["base_model.model." + k] = v.clone()
    return out


def random_adapters(hf_model, seed=1):
    """Random non-zero adapters in the release's layout: {module: {...}} keyed by transformers 5 module names."""
    g = torch.Generator().manual_seed(seed)
    cfg = hf_model.config.text_config
    h, inter = cfg.hidden_size, cfg.intermediate_size
    hd = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    ad = {}
    for i in range(cfg.num_hidden_layers):
        pre = f"model.language_model.layers.{i}."
        for name, (din, dout) in {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, kv),
                                  "self_attn.v_proj": (h, kv)}.items():
            ad[pre + name] = {"A": torch.randn(RANK, din, generator=g) * 0.2,
                              "B": torch.randn(dout, RANK, generator=g) * 0.2}
        for name, (din, dout), router in [("self_attn.o_proj", (h, h), True), ("mlp.gate_proj", (h, inter), True),
                                          ("mlp.up_proj", (h, inter), False), ("mlp.down_proj", (inter, h), False)]:
            e = {"A": {n: torch.randn(RANK, din, generator=g) * 0.2 for n in EXPERT_NAMES},
                 "B": {n: torch.randn(dout, RANK, generator=g) * 0.2 for n in EXPERT_NAMES}}
            if router:
                e["w_gate"] = torch.randn(4, h, generator=g) * 3.0
                e["w_bias"] = torch.randn(4, generator=g)
                e["ln"] = 1 + 0.1 * torch.randn(h, generator=g)
            ad[pre + name] = e
    return ad


def write_release(hf_model, adapters, folder: Path) -> Path:
    sd = release_base_keys(hf_model)
    for mod, a in adapters.items():
        key = "base_model.model." + mod.replace("model.language_model.", "model.")
        if "w_gate" in a or isinstance(a["A"], dict):
            for n in EXPERT_NAMES:
                sd[f"{key}.lora_moe_A.{n}.weight"] = a["A"][n]
                sd[f"{key}.lora_moe_B.{n}.weight"] = a["B"][n]
            if "w_gate" in a:
                sd[f"{key}.w_gate.weight"] = a["w_gate"]
                sd[f"{key}.w_gate.bias"] = a["w_bias"]
                sd[f"{key}.ln.weight"] = a["ln"]
        else:
            sd[f"{key}.lora_A.default.weight"] = a["A"]
            sd[f"{key}.lora_B.default.weight"] = a["B"]
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sd, folder / "pytorch_model.bin")
    return folder


def non_square_image(tmp_path: Path, size=(140, 84), name="wide.png") -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    p = tmp_path / name
    Image.fromarray(arr).save(p)
    return p

"""Tiny MoE-LLaVA pieces built in the tests from random weights (no hub): transformers' Phi / StableLM / CLIP /
SigLIP models, a reference MoE written from the formula, and checkpoint folders in the original's key layout."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moevl.model.moe_llava.checkpoint import TINY_ASSETS

NUM_EXPERTS = 4
MM_HIDDEN = 32
IMAGE_SIZE = 56


def _perturb(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # make every weight matter (default init leaves biases/norms trivial)
        for _, p in sorted(m.named_parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m.eval()


def tiny_phi(seed=0):
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(seed)
    cfg = PhiConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, partial_rotary_factor=0.4, rope_theta=10000.0, layer_norm_eps=1e-5,
                    max_position_embeddings=1024, hidden_act="gelu_new", eos_token_id=0, pad_token_id=0,
                    bos_token_id=0, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    m = _perturb(PhiForCausalLM(cfg), seed)
    with torch.no_grad():
        m.lm_head.bias.zero_()  # MoE-LLaVA's Phi lm_head has no bias
    return m


def tiny_stablelm(seed=0):
    from transformers import StableLmConfig, StableLmForCausalLM

    torch.manual_seed(seed)
    cfg = StableLmConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_qkv_bias=True, partial_rotary_factor=0.25,
                         rope_theta=10000.0, layer_norm_eps=1e-5, max_position_embeddings=1024, eos_token_id=0,
                         pad_token_id=0, bos_token_id=0, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    return _perturb(StableLmForCausalLM(cfg), seed)


def tiny_clip(seed=0):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=MM_HIDDEN, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    cfg._attn_implementation = "eager"
    return _perturb(CLIPVisionModel(cfg), seed + 1)


def tiny_siglip(seed=0):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(hidden_size=MM_HIDDEN, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=14,
                             hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    cfg._attn_implementation = "eager"
    return _perturb(SiglipVisionModel(cfg), seed + 1)


def write_tower_folder(tower, folder: Path, kind: str) -> Path:
    """A local CLIP/SigLIP folder: config.json + weights (+ the image processor settings)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tower.save_pretrained(str(folder))
    if kind == "clip":
        CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                              crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(str(folder))
    else:
        SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(str(folder))
    return folder


# ------------------------------------------------------------------------------------------------ MoE
def dense_mlp_names(arch):
    return ["fc1", "fc2"] if arch == "phi" else ["gate_proj", "up_proj", "down_proj"]


def make_moe_weights(lm, arch, moe_layers, experts="random", seed=5):
    """{layer: (router [E, H], [expert state dicts in the dense MLP's names])}.

    experts="copies": every expert is the dense FFN (sparse upcycling at init) -> the MoE equals the dense FFN.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in moe_layers:
        dense = {k: v.clone() for k, v in lm.model.layers[i].mlp.state_dict().items()}
        router = 0.5 * torch.randn(NUM_EXPERTS, lm.config.hidden_size, generator=g)
        ex = []
        for _ in range(NUM_EXPERTS):
            ex.append({k: v + (0.05 * torch.randn(v.shape, generator=g) if experts == "random" else 0)
                       for k, v in dense.items()})
        out[i] = (router, ex)
    return out


class ReferenceMoE(nn.Module):
    """The MoE layer from the formula, on a [B, T, H] input (all B*T tokens together, as DeepSpeed sees them):
    p = softmax(x Wg^T) in fp32; e1 = argmax p; e2 = the next largest p ("deterministic") or
    argmax(logits + Gumbel) without e1 ("deepspeed", DeepSpeed 0.9.5's torch.distributions draw from the global
    RNG); y = (p1 E_e1(x) + p2 E_e2(x)) / (p1 + p2). Every expert runs on every token (no dispatch)."""

    def __init__(self, router, experts: list[nn.Module], mode="deterministic"):
        super().__init__()
        self.router = router
        self.experts = nn.ModuleList(experts)
        self.mode = mode
        self.last_choice = None

    def forward(self, x):
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        logits = flat.float() @ self.router.float().t()
        p = torch.softmax(logits, dim=-1)
        e1 = p.argmax(-1)
        if self.mode == "deepspeed":
            noise = torch.distributions.gumbel.Gumbel(torch.tensor(0.0), torch.tensor(1.0)).rsample(logits.shape)
            e2 = (logits + noise).scatter(1, e1[:, None], float("-inf")).argmax(-1)
        else:
            e2 = p.scatter(1, e1[:, None], float("-inf")).argmax(-1)
        p1, p2 = p.gather(1, e1[:, None]), p.gather(1, e2[:, None])
        outs = torch.stack([e(flat) for e in self.experts])  # [E, N, H]
        n = torch.arange(flat.shape[0])
        y = (p1 * outs[e1, n] + p2 * outs[e2, n]) / (p1 + p2)
        self.last_choice = torch.stack([e1, e2], dim=1)
        return y.view(b, t, h).to(x.dtype)


def patch_reference_moe(lm, moe_weights, mode="deterministic"):
    """A deep copy of the transformers model whose MoE layers are ReferenceMoE (experts: copies of its MLP class)."""
    import copy

    ref = copy.deepcopy(lm)
    for i, (router, experts) in moe_weights.items():
        mods = []
        for sd in experts:
            m = copy.deepcopy(lm.model.layers[i].mlp)
            m.load_state_dict(sd)
            mods.append(m)
        ref.model.layers[i].mlp = ReferenceMoE(router, mods, mode)
    return ref.eval()


# ------------------------------------------------------------------------------------------------ checkpoints
def original_config(lm, arch, moe_layers, tower_name="local/tiny-clip", kind="clip"):
    c = lm.config
    d = {"model_type": f"moe_llava_{arch}", "architectures": [f"EvalMoELLaVA{arch.capitalize()}ForCausalLM"],
         "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
         "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
         "num_key_value_heads": c.num_key_value_heads, "max_position_embeddings": c.max_position_embeddings,
         "rope_theta": c.rope_parameters["rope_theta"], "eos_token_id": 0, "pad_token_id": 0,
         "tie_word_embeddings": False,
         "moe": {"moe_enable": True, "moe_mode": "sparse", "moe_layers_idx": list(moe_layers), "ep_size": 1,
                 "num_experts": [NUM_EXPERTS] * len(moe_layers), "top_k_experts": 2, "capacity_factor": 1.5,
                 "eval_capacity_factor": 2.0, "min_capacity": 0, "use_residual": False,
                 "router_aux_loss_coef": 0.01, "train_modules": ["fc1", "fc2", "wg"]},
         "mm_image_tower": tower_name, "mm_hidden_size": MM_HIDDEN, "image_projector_type": "mlp2x_gelu",
         "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad"}
    if arch == "phi":  # transformers 4.37 Phi field names
        d.update(partial_rotary_factor=c.rope_parameters["partial_rotary_factor"], layer_norm_eps=c.layer_norm_eps,
                 hidden_act="gelu_new")
    else:  # stablelm_epoch field names
        d.update(rope_pct=c.rope_parameters["partial_rotary_factor"], norm_eps=c.layer_norm_eps, use_qkv_bias=True,
                 hidden_act="silu")
    return d


def random_projector(hidden, seed=7):
    g = torch.Generator().manual_seed(seed)
    return {"0.weight": 0.2 * torch.randn(hidden, MM_HIDDEN, generator=g), "0.bias": 0.02 * torch.randn(hidden, generator=g),
            "2.weight": 0.1 * torch.randn(hidden, hidden, generator=g), "2.bias": 0.02 * torch.randn(hidden, generator=g)}


def original_state_dict(lm, arch, moe_weights, projector, tower=None) -> dict[str, torch.Tensor]:
    """The original's key layout: DeepSpeed expert names, image_spatial_proj, image_tower.image_tower.*"""
    sd = {}
    for k, v in lm.state_dict().items():
        if k == "lm_head.bias":
            continue
        layer = int(k.split(".")[2]) if k.startswith("model.layers.") else None
        if layer in moe_weights and ".mlp." in k:
            continue
        sd[k] = v.clone()
    for i, (router, experts) in moe_weights.items():
        pre = f"model.layers.{i}.mlp.deepspeed_moe."
        sd[pre + "gate.wg.weight"] = router.clone()
        for e, ex in enumerate(experts):
            for k, v in ex.items():
                sd[f"{pre}experts.deepspeed_experts.{e}.{k}"] = v.clone()
    for k, v in projector.items():
        sd[f"model.mm_projector.image_spatial_proj.{k}"] = v.clone()
    if tower is not None:
        for k, v in tower.state_dict().items():
            # the original was saved with transformers 4.x, whose CLIPVisionModel nests everything in vision_model
            k = k if k.startswith("vision_model.") else "vision_model." + k
            sd["model.image_tower.image_tower." + k] = v.clone()
    return sd


def write_original_folder(folder: Path, config: dict, sd: dict[str, torch.Tensor], shards=2) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    for s in range(shards):
        part = {k: sd[k].contiguous() for k in keys[s::shards]}
        save_file(part, str(folder / f"model-{s + 1:05d}-of-{shards:05d}.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(TINY_ASSETS / f, folder / f)
    return folder


# ------------------------------------------------------------------------------------------------ references
def reference_image_tokens(tower, projector, pixels):
    """transformers' tower: hidden_states[-2] without token 0, then the mlp2x_gelu projector (exact GELU)."""
    with torch.no_grad():
        h = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        h = F.gelu(F.linear(h, projector["0.weight"], projector["0.bias"]))
        return F.linear(h, projector["2.weight"], projector["2.bias"])


def reference_logits(lm, batch, image_tokens=None):
    """transformers' decoder on our batch: the image tokens written where the <image> sentinel was expanded;
    positions counted over real tokens (what generate() passes for left padding)."""
    ids = batch.input_ids
    with torch.no_grad():
        emb = lm.model.embed_tokens(ids.clamp(min=0))
        if image_tokens is not None:
            emb[ids == -200] = image_tokens.reshape(-1, emb.shape[-1])
        pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        return lm(inputs_embeds=emb, attention_mask=batch.attention_mask, position_ids=pos).logits

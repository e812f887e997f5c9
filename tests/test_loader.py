"""Loading checkpoints: our format round trip, the release layout, and the errors for bad checkpoints."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from moevl.ascend.device import resolve_device
from moevl.kernels import get_kernels
from moevl import load
from moevl.model.awaker.checkpoint import load_awaker
from moevl.model.checkpoint import CheckpointError, save
from moevl.model.awaker.session import AwakerSession
from moevl.model.tiny import DEMO_IMAGE
from tests.awaker_fixtures import random_adapters, tiny_hf_model, write_hf_folder, write_release

CPU = resolve_device("cpu")


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model(seed=5)


@pytest.fixture(scope="module")
def release(hf, tmp_path_factory):
    base = write_hf_folder(hf, tmp_path_factory.mktemp("base"))
    rel = write_release(hf, random_adapters(hf, seed=7), tmp_path_factory.mktemp("release"))
    return base, rel


def logits_of(session, question="What is in the picture?"):
    return session.score(session.prepare([question], [[DEMO_IMAGE]]))


def test_save_and_load_our_format_reproduces_outputs(release, tmp_path):
    base, rel = release
    model, proc = load_awaker(rel, CPU, base=base)
    model.set_kernels(get_kernels(CPU.kernel_backend))  # the kernels load() picks, so the comparison is exact
    s1 = AwakerSession(model, proc, CPU)
    out = save(model, proc.folder, tmp_path / "saved")
    assert (out / "moevl_config.json").is_file() and (out / "model.safetensors").is_file()
    s2 = load(out, device="cpu")
    torch.testing.assert_close(logits_of(s1), logits_of(s2), rtol=0, atol=0)
    assert s2.routing_decisions() == s1.routing_decisions()


def test_save_refuses_an_existing_folder_and_leaves_no_temporary(release, tmp_path):
    base, rel = release
    model, proc = load_awaker(rel, CPU, base=base)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        save(model, proc.folder, tmp_path / "taken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_release_without_base_config_says_what_to_pass(release):
    _, rel = release
    with pytest.raises(CheckpointError, match="--base"):
        load_awaker(rel, CPU)


def test_corrupt_release_file(release, tmp_path):
    base, rel = release
    bad = tmp_path / "bad"
    bad.mkdir()
    data = (rel / "pytorch_model.bin").read_bytes()
    (bad / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        load_awaker(bad, CPU, base=base)


def test_corrupt_safetensors(hf, tmp_path):
    folder = write_hf_folder(hf, tmp_path / "hf")
    f = next(folder.glob("*.safetensors"))
    f.write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_awaker(folder, CPU)


def test_missing_unknown_and_misshaped_keys_are_listed_by_name(hf, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = write_hf_folder(hf, tmp_path / "hf")
    f = next(folder.glob("*.safetensors"))
    sd = load_file(str(f))
    sd.pop("model.norm.weight")
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    sd["model.extra.weight"] = torch.zeros(2)
    save_file(sd, str(f))
    with pytest.raises(CheckpointError) as e:
        load_awaker(folder, CPU)
    msg = str(e.value)
    assert "missing (1): model.norm.weight" in msg
    assert "unexpected (1): model.extra.weight" in msg
    assert "model.layers.0.self_attn.q_proj.weight (3, 3) != (64, 64)" in msg


def test_incomplete_expert_set_is_reported(hf, tmp_path):
    adapters = random_adapters(hf, seed=2)
    rel = write_release(hf, adapters, tmp_path / "rel")
    sd = torch.load(rel / "pytorch_model.bin", weights_only=True)
    sd = {k: v for k, v in sd.items() if "mlp.up_proj.lora_moe_B.2" not in k}
    torch.save(sd, rel / "pytorch_model.bin")
    base = write_hf_folder(hf, tmp_path / "base")
    with pytest.raises(CheckpointError, match="up_proj"):
        load_awaker(rel, CPU, base=base)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a model folder"):
        load(tmp_path, device="cpu")
    with pytest.raises(CheckpointError, match="neither a preset"):
        load(tmp_path / "nope", device="cpu")


def test_config_and_tokenizer_from_different_models(hf, tmp_path):
    folder = write_hf_folder(hf, tmp_path / "hf")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["image_token_id"] = 7
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="different models"):
        load_awaker(folder, CPU)


def test_unknown_device_is_a_clear_error():
    from moevl.ascend.errors import DeviceError

    with pytest.raises(DeviceError, match="cpu"):
        load("awaker-tiny", device="tpu")


def test_bf16_release_loaded_in_fp32_equals_the_same_weights_stored_in_fp32(hf, tmp_path):
    """q/k/v LoRA is merged in the compute dtype, not rounded back to the checkpoint's bf16 first."""
    rel = write_release(hf, random_adapters(hf, seed=3), tmp_path / "rel")
    base = write_hf_folder(hf, tmp_path / "base")
    sd = torch.load(rel / "pytorch_model.bin", weights_only=True)
    bf16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    torch.save(bf16, rel / "pytorch_model.bin")
    (tmp_path / "rel32").mkdir()
    torch.save({k: v.float() for k, v in bf16.items()}, tmp_path / "rel32" / "pytorch_model.bin")
    a, _ = load_awaker(rel, CPU, base=base)
    b, _ = load_awaker(tmp_path / "rel32", CPU, base=base)
    for name, w in a.state_dict().items():
        assert w.dtype == torch.float32
        assert (w - b.state_dict()[name]).abs().max().item() <= 1e-4, name


def test_legacy_non_zip_torch_save_is_read(hf, tmp_path):
    rel = write_release(hf, random_adapters(hf, seed=4), tmp_path / "rel")
    sd = torch.load(rel / "pytorch_model.bin", weights_only=True)
    torch.save(sd, rel / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    base = write_hf_folder(hf, tmp_path / "base")
    model, _ = load_awaker(rel, CPU, base=base)  # used to be refused as "may be truncated"
    assert model.cfg.adapters.num_experts > 0


def test_missing_base_folder_is_said_to_not_exist(hf, tmp_path):
    rel = write_release(hf, random_adapters(hf, seed=4), tmp_path / "rel")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_awaker(rel, CPU, base=tmp_path / "nope")


def test_config_without_attention_heads_names_the_field(hf, tmp_path):
    folder = write_hf_folder(hf, tmp_path / "hf")
    cfg = json.loads((folder / "config.json").read_text())
    for d in (cfg, cfg.get("text_config") or {}):
        d.pop("num_attention_heads", None)
    (folder / "config.json").write_text(json.dumps(cfg))
    from moevl.model.checkpoint import ConfigError

    with pytest.raises(ConfigError, match="num_attention_heads"):
        load_awaker(folder, CPU)


def test_our_format_without_family_names_the_file(tmp_path):
    (tmp_path / "moevl_config.json").write_text(json.dumps({"config": {}}))
    with pytest.raises(CheckpointError, match='moevl_config.json names no "family"'):
        load(tmp_path, device="cpu")


def test_mixed_lora_ranks_are_named_not_a_stack_traceback(hf, tmp_path):
    rel = write_release(hf, random_adapters(hf, seed=2), tmp_path / "rel")
    sd = torch.load(rel / "pytorch_model.bin", weights_only=True)
    key = next(k for k in sd if "mlp.up_proj.lora_moe_A.1" in k)
    sd[key] = sd[key][:2].clone()  # rank 2 for one expert
    bkey = key.replace("lora_moe_A", "lora_moe_B")
    sd[bkey] = sd[bkey][:, :2].clone()
    torch.save(sd, rel / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="have ranks"):
        load_awaker(rel, CPU, base=write_hf_folder(hf, tmp_path / "base"))

"""Reading and writing checkpoints, for every family: tensors from safetensors / PyTorch files, checking and
assigning them to a model built on the meta device, and the kit's own format.

Our format, written by ``save``: ``moevl_config.json`` ({"family": ..., "config": ...}) + ``model.safetensors`` +
the tokenizer/processor files. A family's own formats (Hugging Face folders, the original releases) are read by its
``checkpoint`` module, which maps their keys onto ours. Unknown, missing and mis-shaped keys are reported by name.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import torch

OUR_CONFIG = "moevl_config.json"
OUR_WEIGHTS = "model.safetensors"
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json", "special_tokens_map.json", "added_tokens.json",
                   "preprocessor_config.json", "generation_config.json")


class ConfigError(ValueError):
    """A model configuration that is missing, malformed or describes something the kit does not implement."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: missing, corrupt, or not matching the model."""


def listing(title: str, keys, limit: int = 12) -> str:
    """'title (n): a, b, c ... and k more' for error messages that name keys."""
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{title} ({len(keys)}): " + ", ".join(keys[:limit]) + more


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e


# --------------------------------------------------------------------------- reading tensors
def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has no *.safetensors weight files")
    out = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f} is not a readable safetensors file ({e}); re-download or re-save it") from e
    return out


def read_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    import zipfile

    # mmap needs torch.save's zip format; a legacy (pre-1.6, _use_new_zipfile_serialization=False) file is read
    # whole instead of being refused as truncated
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # torch raises many types for a truncated/corrupt pickle
        raise CheckpointError(f"{path} could not be read as a PyTorch state dict ({type(e).__name__}: {e}); "
                              "the file may be truncated — check its size and checksum") from e
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return sd


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder: its *.safetensors files, else its pytorch_model*.bin files."""
    if any(folder.glob("*.safetensors")):
        return read_safetensors_folder(folder)
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise CheckpointError(f"{folder} has no *.safetensors or pytorch_model*.bin weight files")
    out = {}
    for b in bins:
        out.update(read_torch_bin(b))
    return out


def model_type(folder: Path) -> str | None:
    """``model_type`` of a folder's config.json (None when there is none)."""
    if not (folder / "config.json").is_file():
        return None
    return read_json(folder / "config.json").get("model_type")


# --------------------------------------------------------------------------- our format
def read_our_format(folder: Path, family: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """-> (the family's config dict, tensors) of a folder written by ``save``."""
    meta = read_json(folder / OUR_CONFIG)
    if meta.get("family") != family:
        raise CheckpointError(f"{folder} holds a {meta.get('family')!r} model, not {family}")
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{folder / OUR_CONFIG} has no \"config\" object: re-save the model with moevl")
    if not (folder / OUR_WEIGHTS).is_file():
        raise CheckpointError(f"{folder / OUR_WEIGHTS} is missing")
    return meta["config"], read_safetensors_folder(folder)


# --------------------------------------------------------------------------- writing output folders
# Every folder the kit writes (a checkpoint, an ONNX export, an OM folder) is built under a hidden temporary name
# beside the target, ``.<name>.partial-<pid>-<random>``, and renamed into place when complete. The pid names the
# owner, so a later run can remove the partials of a process that was killed (SIGKILL cannot be caught) and
# never those of a run still going. --force replaces only a folder the kit wrote itself, recognised by a marker
# file (or an empty folder: nothing to lose); anything else is refused.
@dataclasses.dataclass(frozen=True)
class OutputKind:
    """A kind of folder the kit writes, recognised by its marker file (and the marker's "format" field)."""

    what: str                 # "a moevl checkpoint", in error messages
    marker: str               # a file every such folder has
    format: str | None = None  # the marker's JSON "format" field, when it has one

    def describe(self) -> str:
        return f'{self.marker} with "format": "{self.format}"' if self.format else self.marker

    def wrote(self, folder: Path) -> bool:
        """Whether ``folder`` is one of ours (the only kind of folder that --force may replace)."""
        path = folder / self.marker
        if not path.is_file():
            return False
        if self.format is None:
            return True
        try:
            return json.loads(path.read_text()).get("format") == self.format
        except (OSError, ValueError, AttributeError):
            return False


CHECKPOINT = OutputKind("a moevl checkpoint", OUR_CONFIG)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP while an output folder is being written, raised like Ctrl-C so that the cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def termination_interrupts():
    """SIGTERM and SIGHUP raise ``Interrupted`` in the main thread for the duration (where they still have their
    default action: an ignored signal, e.g. under nohup, or someone else's handler is left alone)."""
    if threading.current_thread() is not threading.main_thread():  # signal.signal works in the main thread only
        yield
        return

    def interrupt(signum, frame):
        raise Interrupted(signum)

    previous = {}
    for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if signum is not None and signal.getsignal(signum) == signal.SIG_DFL:
            previous[signum] = signal.signal(signum, interrupt)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def check_output_folder(out: Path, kind: OutputKind, force: bool, flag: str = "--force",
                        other: str = "another --out") -> None:
    """Refuse ``out`` unless it is free, or ``force`` is set and it is a folder ``kind`` that the kit wrote (or an
    empty folder). One FileExistsError line naming the folder and what to do."""
    out = Path(out)
    _check_writable(out.parent if out.parent != Path("") else Path("."), other)
    if out.is_symlink():
        raise FileExistsError(f"{out} is a symbolic link; choose {other} or remove the link yourself")
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} already exists and is a file, not {kind.what}; choose {other}")
    if not (kind.wrote(out) or not any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not {kind.what} (it has no {kind.describe()}), so "
                              f"{flag} will not replace it; choose {other} or move that folder away yourself")
    if not force:
        raise FileExistsError(f"{out} already exists; choose {other} or pass {flag} to replace it")


class OutputLocationError(ValueError):
    """The folder an output would be written into cannot be written (checked before any slow work)."""


def _check_writable(parent: Path, other: str) -> None:
    """Create and remove a probe folder where the output's temporary folder will go: a read-only, permission-
    denied or full disk fails here, before a model is loaded, instead of after minutes of work."""
    probe = parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent  # the output folder's parents are created when writing
    try:
        tmp = tempfile.mkdtemp(prefix=".moevl-write-check-", dir=probe)
        os.rmdir(tmp)
    except OSError as e:
        raise OutputLocationError(f"cannot write in {probe} ({e.strerror or e}): choose {other} on a writable "
                                  "disk with free space") from None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: another user's live process; anything odd: keep the folder
        return True
    return True


def remove_stale_partials(out: Path, log=None) -> list[Path]:
    """Remove the temporary folders of ``out`` left by runs that were killed (their pid is no longer alive)."""
    out = Path(out)
    pattern = re.compile(re.escape(f".{out.name}.") + r"(?:partial|old)-(\d+)-[A-Za-z0-9_]+")
    removed = []
    if not out.parent.is_dir():
        return removed
    for entry in out.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _pid_alive(int(match[1])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
            if log is not None:
                log(f"removed {entry}, left by an interrupted run (process {match[1]})")
    return removed


def _new_partial(out: Path) -> Path:
    """A new empty ``.<name>.partial-<pid>-<random>`` beside ``out`` (mode from the umask, as ``out`` will have)."""
    while True:
        tmp = out.with_name(f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def _move_into_place(tmp: Path, out: Path) -> Path | None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (already checked) is moved aside first and put back if the
    rename fails. -> the old folder, to delete, or None."""
    if not out.exists():
        os.replace(tmp, out)
        return None
    old = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    return old


@contextlib.contextmanager
def output_folder(out: Path, kind: OutputKind, force: bool = False, flag: str = "--force",
                  other: str = "another --out", log=None):
    """Write a folder atomically: yields a temporary folder beside ``out`` that replaces ``out`` when the block
    ends without an error. An error, Ctrl-C, SIGTERM or SIGHUP removes it and leaves ``out`` as it was; ``out``
    must pass ``check_output_folder`` (before and again at the end)."""
    out = Path(out)
    check_output_folder(out, kind, force, flag, other)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out, log)
    old = None
    with termination_interrupts():
        tmp = _new_partial(out)
        try:
            yield tmp
            check_output_folder(out, kind, force, flag, other)  # out may have appeared meanwhile
            old = _move_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # a failure leaves it to the next run's remove_stale_partials


def save(model, processor_folder: Path | None, out: str | Path, overwrite: bool = False,
         extra_files: dict[str, str] | None = None) -> Path:
    """Write our format atomically (``output_folder``); ``overwrite`` replaces only a checkpoint written by
    ``save``. ``extra_files``: name -> text or bytes written beside the weights (e.g. image processor settings)."""
    from safetensors.torch import save_file

    out = Path(out)
    with output_folder(out, CHECKPOINT, overwrite, flag="overwrite=True (--force)", other="another folder") as tmp:
        sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(tmp / OUR_WEIGHTS))
        (tmp / OUR_CONFIG).write_text(json.dumps({"family": model.cfg.family, "config": model.cfg.to_dict()},
                                                 indent=2))
        if processor_folder is not None:
            for name in PROCESSOR_FILES:
                if (Path(processor_folder) / name).is_file():
                    shutil.copy2(Path(processor_folder) / name, tmp / name)
        for name, content in (extra_files or {}).items():  # text, or bytes (may name a sub-folder)
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content)
    return out


# --------------------------------------------------------------------------- loading into a model
def build_on_meta(model_class, cfg):
    """The network with no storage: weights are assigned from the checkpoint (no double allocation)."""
    with torch.device("meta"):
        return model_class(cfg)


def assign_weights(model, sd: dict[str, torch.Tensor], dtype: torch.dtype, device, source: str) -> None:
    """Check names and shapes against the model, then assign (cast to dtype, moved to device)."""
    if any(k.endswith(".qweight") for k in sd):  # written by `moevl quantize`: build its quantised linears/experts
        from moevl.kernels.quant import prepare_for_state_dict

        prepare_for_state_dict(model, sd, dtype)
    expected = dict(model.state_dict())
    if "lm_head.weight" not in sd and model.cfg.tie_word_embeddings and "model.embed_tokens.weight" in sd:
        sd = dict(sd, **{"lm_head.weight": sd["model.embed_tokens.weight"]})
    missing = set(expected) - set(sd)
    unknown = set(sd) - set(expected)
    bad = {k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape)}
    if missing or unknown or bad:
        parts = [f"the weights in {source} do not match the model"]
        if missing:
            parts.append(listing("missing", missing))
        if unknown:
            parts.append(listing("unexpected", unknown))
        if bad:
            parts.append(listing("wrong shape", [f"{k} {tuple(sd[k].shape)} != {tuple(expected[k].shape)}"
                                                 for k in bad]))
        parts.append("check that the config (layers, sizes, experts, rank) belongs to these weights")
        raise CheckpointError("\n  ".join(parts))
    note_upcast(sd, dtype, source)
    model.load_state_dict({k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                           for k, v in sd.items()}, assign=True)
    model.init_buffers(device)


def note_upcast(sd: dict[str, torch.Tensor], dtype: torch.dtype, source: str) -> None:
    """Say so (a warning on the ``moevl`` logger, which the CLI prints as one note line) when a checkpoint stored
    mostly in a 16-bit dtype is loaded in a wider one: its weights then take twice the memory (fp32 is the CPU
    default; the 22 GB bf16 Awaker release needs ~44 GB in fp32)."""
    stored: dict[torch.dtype, int] = {}
    for v in sd.values():
        if v.is_floating_point():
            stored[v.dtype] = stored.get(v.dtype, 0) + v.numel()
    if not stored:
        return
    main = max(stored, key=stored.get)
    if main.itemsize >= dtype.itemsize:
        return
    numel = sum(stored.values())
    from moevl.ascend.device import dtype_name

    logging.getLogger("moevl").warning(
        "%s stores its weights in %s; loading them in %s takes %.2f GB instead of %.2f GB: pass --dtype %s "
        "(dtype=%r) to keep them as stored where the device runs it",
        source, dtype_name(main), dtype_name(dtype), numel * dtype.itemsize / 1e9, numel * main.itemsize / 1e9,
        dtype_name(main), dtype_name(main))


@torch.no_grad()
def init_random_weights(model: torch.nn.Module, seed: int, rules: list[tuple[tuple[str, ...], str, float]]) -> None:
    """Deterministic random weights, independent of module creation order and of the device (presets, tests).

    rules: (name suffixes, kind, scale), the first match wins; kind "one" = 1 + scale * N(0, 1) (norm gains),
    "fan_in" = N(0, 1) / sqrt(last dim), "normal" = scale * N(0, 1); unmatched names get 0.05 * N(0, 1).
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        kind, scale = next(((k, s) for suffixes, k, s in rules if name.endswith(suffixes)), ("normal", 0.05))
        t = torch.randn(p.shape, generator=g)
        if kind == "one":
            t = 1.0 + scale * t
        elif kind == "fan_in":
            t = t / p.shape[-1] ** 0.5
        else:
            t = scale * t
        p.copy_(t.to(p.dtype))

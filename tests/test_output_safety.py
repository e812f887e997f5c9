"""Output folders: --force replaces only what the kit wrote itself (an ONNX export, a checkpoint, an OM folder),
nothing is left beside the target when a write fails or is refused, the temporary folders of killed runs are
removed by the next run (never those of a live one), and Ctrl-C or SIGTERM during an export cleans up and ends
with one line on stderr."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

import moevl
from moevl.export.graph import CONTRACT
from moevl.export.om import OM_CONFIG, build_om
from moevl.export.onnx import export_onnx
from moevl.model.checkpoint import OUR_CONFIG, save

QUIET = dict(log=lambda *a: None)
GEARS = {"prefill": [32, 64], "decode": [64, 128], "vision": [16, 64]}


@pytest.fixture(scope="module")
def session():
    return moevl.load("awaker-tiny", device="cpu")


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory, session):
    return export_onnx("awaker-tiny", tmp_path_factory.mktemp("export") / "onnx", session=session, validate=False,
                       **QUIET)


def export(session, out, **kw):
    return export_onnx("awaker-tiny", out, session=session, validate=False, **QUIET, **kw)


def user_folder(path):
    path.mkdir()
    (path / "notes.txt").write_text("my notes")
    return path


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: os.kill(pid, 0) now raises ProcessLookupError
    return child.pid


# ----------------------------------------------------------------------------- --force replaces only ours
def test_export_force_refuses_a_user_folder(tmp_path, session):
    out = user_folder(tmp_path / "out")
    with pytest.raises(FileExistsError, match=r"is not a moevl ONNX export .*contract\.json"):
        export(session, out, force=True)
    assert (out / "notes.txt").read_text() == "my notes"
    assert names(tmp_path) == ["out"] and names(out) == ["notes.txt"]


def test_save_overwrite_refuses_a_user_folder(tmp_path, session):
    out = user_folder(tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match=r"is not a moevl checkpoint .*moevl_config\.json"):
        save(session.model, None, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "my notes"
    assert names(tmp_path) == ["ckpt"] and names(out) == ["notes.txt"]


def test_export_force_replaces_an_earlier_export_and_leaves_no_siblings(tmp_path, session):
    out = export(session, tmp_path / "out")
    (out / "stale.onnx").write_text("from the earlier export")
    export(session, out, force=True)
    assert (out / CONTRACT).is_file() and not (out / "stale.onnx").exists()
    assert names(tmp_path) == ["out"]


def test_save_overwrite_replaces_an_earlier_checkpoint_and_leaves_no_siblings(tmp_path, session):
    out = save(session.model, None, tmp_path / "ckpt")
    (out / "stale.txt").write_text("from the earlier save")
    save(session.model, None, out, overwrite=True)
    assert (out / OUR_CONFIG).is_file() and not (out / "stale.txt").exists()
    assert names(tmp_path) == ["ckpt"]


def test_force_onto_a_file_is_refused_and_leaves_nothing(tmp_path, session):
    target = tmp_path / "afile"
    target.write_text("keep me")
    with pytest.raises(FileExistsError, match="is a file"):
        export(session, target, force=True)
    with pytest.raises(FileExistsError, match="is a file"):
        save(session.model, None, target, overwrite=True)
    assert target.read_text() == "keep me" and names(tmp_path) == ["afile"]


def test_a_contract_of_another_format_is_not_ours(tmp_path, session):
    out = tmp_path / "out"
    out.mkdir()
    (out / CONTRACT).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(FileExistsError, match="not a moevl ONNX export"):
        export(session, out, force=True)
    assert json.loads((out / CONTRACT).read_text()) == {"format": "something-else"}


# ----------------------------------------------------------------------------- OM folders
def test_build_om_refuses_an_existing_user_folder_with_or_without_force(onnx_dir, tmp_path):
    out = user_folder(tmp_path / "om")
    with pytest.raises(FileExistsError, match="already exists"):
        build_om(onnx_dir, out, soc="Ascend910B2", gears=GEARS, **QUIET)
    with pytest.raises(FileExistsError, match="is not a moevl OM folder"):
        build_om(onnx_dir, out, soc="Ascend910B2", gears=GEARS, force=True, **QUIET)
    assert names(out) == ["notes.txt"] and names(tmp_path) == ["om"]


def test_build_om_replaces_its_own_folder_only_with_force(onnx_dir, tmp_path):
    out = build_om(onnx_dir, tmp_path / "om", soc="Ascend910B2", gears=GEARS, **QUIET)
    with pytest.raises(FileExistsError, match="--force"):
        build_om(onnx_dir, out, soc="Ascend310P3", gears=GEARS, **QUIET)
    build_om(onnx_dir, out, soc="Ascend310P3", gears=GEARS, force=True, **QUIET)
    config = json.loads((out / OM_CONFIG).read_text())
    assert config["soc"] == "Ascend310P3" and str(out.resolve()) in config["commands"][0]
    assert names(tmp_path) == ["om"]


@pytest.mark.parametrize("options", [dict(gears={"vision": [10, 20]}), dict(gears={"prefill": [0]}),
                                     dict(batch=0), dict(soc="910B"), dict(precision="int4")])
def test_invalid_om_arguments_leave_no_folder(onnx_dir, tmp_path, options):
    with pytest.raises(ValueError):
        build_om(onnx_dir, tmp_path / "om", **{"soc": "Ascend910B2", "gears": GEARS, **options}, **QUIET)
    assert names(tmp_path) == []


def test_cli_invalid_gears_leave_no_folder(onnx_dir, tmp_path, capsys):
    from moevl.cli import main

    assert main(["export", "om", "--onnx", str(onnx_dir), "--soc", "Ascend910B2", "--out", str(tmp_path / "om"),
                 "--gears", "vision=10,20"]) == 2
    assert "multiples of 4" in capsys.readouterr().err and names(tmp_path) == []


# ----------------------------------------------------------------------------- partials of killed runs
def test_stale_partials_of_dead_runs_are_removed_and_live_ones_kept(tmp_path, session):
    dead = tmp_path / f".out.partial-{dead_pid()}-ab12cd34"
    moved_aside = tmp_path / f".out.old-{dead_pid()}-ab12cd34"  # a --force run killed between its two renames
    live = tmp_path / f".out.partial-{os.getpid()}-ab12cd34"
    other = tmp_path / f".other.partial-{dead_pid()}-ab12cd34"  # another target's: not this run's business
    for folder in (dead, moved_aside, live, other):
        folder.mkdir()
        (folder / CONTRACT).write_text("{}")
    export(session, tmp_path / "out")
    assert names(tmp_path) == sorted(["out", live.name, other.name])


def test_save_removes_stale_partials_of_dead_runs(tmp_path, session):
    dead = tmp_path / f".ckpt.partial-{dead_pid()}-ab12cd34"
    live = tmp_path / f".ckpt.partial-{os.getpid()}-ab12cd34"
    dead.mkdir()
    live.mkdir()
    save(session.model, None, tmp_path / "ckpt")
    assert names(tmp_path) == sorted(["ckpt", live.name])


def test_the_termination_handler_is_restored_after_an_export(tmp_path, session):
    before = signal.getsignal(signal.SIGTERM)
    export(session, tmp_path / "out")
    assert signal.getsignal(signal.SIGTERM) == before


# ----------------------------------------------------------------------------- Ctrl-C and SIGTERM
@pytest.mark.parametrize("signum,status,message", [
    (signal.SIGTERM, 128 + signal.SIGTERM, "moevl export: interrupted by SIGTERM; nothing was written"),
    (signal.SIGINT, 130, "moevl export: interrupted; nothing was written"),
])
def test_a_signal_during_an_export_cleans_up_and_says_so_in_one_line(tmp_path, signum, status, message):
    work = tmp_path / "work"
    work.mkdir()
    # each graph after the first waits 5 s before it is traced, so the signal surely lands mid-export (a tiny
    # export is otherwise over within a second, and on a loaded machine the signal could come after it)
    code = ("import sys, time, moevl.export.onnx as o; trace = o._export_graph; "
            "o._export_graph = lambda s, *a: (time.sleep(0 if s.name == 'vision' else 5), trace(s, *a))[1]; "
            "from moevl.cli import main; "
            f"sys.exit(main(['export', 'onnx', '--model', 'awaker-tiny', '--out', {str(work / 'X')!r}, "
            "'--no-validate']))")
    cmd = [sys.executable, "-c", code]
    # SIGINT as a terminal delivers it, even if this test runs where it is ignored (a background job)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stderr:  # the first graph is written: the export is under way
            if line.startswith("exported "):
                break
        else:
            pytest.fail(f"the export ended before writing a graph (exit {proc.wait()})")
        proc.send_signal(signum)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == status
    finally:
        proc.kill()
        proc.wait()
    assert rest.splitlines() == [message]
    assert names(work) == []


def test_an_unwritable_output_location_fails_before_loading(tmp_path, monkeypatch):
    """(as root a chmod would not stop writing, so the file system's refusal is simulated)"""
    import tempfile as tf

    from moevl.export.onnx import export_onnx
    from moevl.model.checkpoint import OutputLocationError

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    loaded = []
    monkeypatch.setattr(tf, "mkdtemp", refuse)
    monkeypatch.setattr("moevl.export.onnx.load_for_export", lambda *a, **k: loaded.append(1))
    with pytest.raises(OutputLocationError, match="cannot write in .*Permission denied"):
        export_onnx("awaker-tiny", tmp_path / "out", log=lambda *a: None)
    assert loaded == [] and list(tmp_path.iterdir()) == []


def test_a_failing_atc_is_one_line_and_leaves_nothing(tmp_path, onnx_dir, monkeypatch):
    from moevl.export.graph import ExportError

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    atc = bin_dir / "atc"
    atc.write_text("#!/bin/sh\necho 'ATC run failed, Please check the detail log'\necho 'E10001: bad soc' >&2\nexit 1\n")
    atc.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "om"
    with pytest.raises(ExportError, match="atc failed for .* E10001: bad soc") as e:
        build_om(onnx_dir, out, soc="Ascend910B2", log=lambda *a: None)
    assert "\n" not in str(e.value) and not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bin"]

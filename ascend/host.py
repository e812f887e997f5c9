"""Facts about the Ascend software stack installed on a host, read through one injectable ``Host``.

``Host`` bundles everything the checks look at -- filesystem root, environment, PATH lookup, command runner,
installed package versions -- so tests (and ``moevl doctor``) can describe a fake host instead of this one.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from moevl.ascend import npu_probe

TOOLKIT_CANDIDATES = (
    "/usr/local/Ascend/ascend-toolkit/latest",  # CANN <= 8.3 default install (and the ascendai/cann images)
    "/usr/local/Ascend/cann",  # CANN >= 8.5 default install
)
DRIVER_VERSION_FILE = "/usr/local/Ascend/driver/version.info"


def run_command(argv: list[str]) -> str | None:
    """stdout of a command, or None if it cannot run, fails or hangs."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


@dataclass
class Host:
    root: Path = Path("/")
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    which: Callable[[str], str | None] | None = None  # name -> host path; default searches env["PATH"] under root
    run: Callable[[list[str]], str | None] = run_command  # argv -> stdout, None on failure
    versions: Callable[[str], str | None] = npu_probe.installed_version  # distribution -> version

    def path(self, host_path: str) -> Path:
        """Where an absolute path of the described host lives on this filesystem."""
        return Path(self.root) / host_path.lstrip("/")

    def find_program(self, name: str) -> str | None:
        if self.which is not None:
            return self.which(name)
        for directory in self.env.get("PATH", "").split(os.pathsep):
            if directory and os.access(self.path(os.path.join(directory, name)), os.X_OK):
                return os.path.join(directory, name)
        return None

    def read_text(self, host_path: str) -> str | None:
        try:
            return self.path(host_path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None


@dataclass(frozen=True)
class Toolkit:
    home: str  # host path, e.g. /usr/local/Ascend/ascend-toolkit/latest
    version: str | None
    set_env: str | None  # host path of set_env.sh, if found
    source: str  # where we learned the home: an env var name or "default path"


def find_toolkit(host: Host) -> Toolkit | None:
    """Locate the CANN toolkit: $ASCEND_TOOLKIT_HOME, $ASCEND_HOME_PATH, then the default install paths."""
    candidates = [(host.env[var], var) for var in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH") if host.env.get(var)]
    candidates += [(path, "default path") for path in TOOLKIT_CANDIDATES]
    for home, source in candidates:
        if host.path(home).is_dir():
            home = home.rstrip("/")
            return Toolkit(home, toolkit_version(host, home), _find_set_env(host, home), source)
    return None


def _find_set_env(host: Host, home: str) -> str | None:
    # set_env.sh sits beside "latest" (ascend-toolkit/set_env.sh) or inside the home (cann-8.5.0/set_env.sh).
    for candidate in (os.path.join(os.path.dirname(home), "set_env.sh"), os.path.join(home, "set_env.sh")):
        if host.path(candidate).is_file():
            return candidate
    return None


def toolkit_version(host: Host, home: str) -> str | None:
    """CANN version from version.cfg ("toolkit_running_version=[7.6.0.1.220:8.0.0]") or *_install.info."""
    cfg = host.read_text(os.path.join(home, "version.cfg"))
    if cfg:
        match = re.search(r"^(?:toolkit|runtime)_running_version=\[[^:\]]*:([^\]]+)\]", cfg, re.MULTILINE)
        if match:
            return match.group(1).strip()
    home_dir = host.path(home)
    for info in sorted(home_dir.glob("*-linux/ascend_toolkit_install.info")) + sorted(home_dir.glob("*_install.info")):
        match = re.search(r"^version=(\S+)", info.read_text(encoding="utf-8", errors="replace"), re.MULTILINE)
        if match:
            return match.group(1)
    resolved = home_dir.resolve().name  # "latest" is usually a symlink to a directory named after the version
    return resolved if re.match(r"\d+\.\d+", resolved) else None


def set_env_sourced(host: Host, toolkit: Toolkit) -> bool:
    """set_env.sh puts <toolkit>/lib64 on LD_LIBRARY_PATH; that is what torch_npu needs to find libhccl.so."""
    wanted = {os.path.normpath(os.path.join(toolkit.home, "lib64"))}
    wanted.add(os.path.normpath(os.path.join(os.path.realpath(host.path(toolkit.home)), "lib64")))
    entries = {os.path.normpath(p) for p in host.env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p}
    return bool(wanted & entries)


def driver_version(host: Host) -> str | None:
    """From /usr/local/Ascend/driver/version.info ("Version=24.1.rc3" / "package_version=24.1.rc3")."""
    text = host.read_text(DRIVER_VERSION_FILE)
    if text is None:
        return None
    match = re.search(r"^(?:package_version|Version)\s*=\s*(\S+)", text, re.MULTILINE | re.IGNORECASE)
    return match.group(1) if match else "unknown (version.info has no Version= line)"


@dataclass(frozen=True)
class NpuSmiDevice:
    npu_id: int
    name: str  # as npu-smi prints it: "910B3", "310P3"
    health: str


def parse_npu_smi(text: str) -> list[NpuSmiDevice]:
    """Devices from the table `npu-smi info` prints.

    Each NPU starts with a row "| 0     910B3   | OK   | ...": an id, then a chip name made of letters and digits.
    Chip rows below it ("| 0     0   | 0000:C1:00.0 | ...") have a number where the name would be and are skipped.
    """
    devices = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2:
            continue
        match = re.fullmatch(r"(\d+)\s+(Ascend\w+|\d{3}[A-Za-z]\w*)", cells[0])
        if match:
            devices.append(NpuSmiDevice(int(match.group(1)), match.group(2), cells[1].split()[0] if cells[1] else ""))
    return devices


def ascend_soc_name(chip: str) -> str:
    """"910B3" -> "Ascend910B3": the --soc_version ATC expects."""
    return chip if chip.startswith("Ascend") else f"Ascend{chip}"

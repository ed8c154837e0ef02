"""What this machine and checkout are: the CPU (model, flags, the ISA torch dispatches to), the
library versions, the git commit, and where the project's shared data lives.

Benchmarks, the cost model and the tuner record these with every number they write, so a result
always says where it was measured. Nothing here decides a code path: kernels read the ISA from
torch themselves; this module only describes.
"""

from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]  # <repo>/src/eagle2/machine.py -> <repo>


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown"


def cpuinfo_flags() -> set[str]:
    """Every flag Linux lists for this CPU (empty where /proc/cpuinfo is not readable)."""
    return set((_cpuinfo_field("flags") or "").split())


def cpu_flags() -> list[str]:
    """The vector-ISA flags that decide which kernels run fast here."""
    have = cpuinfo_flags()
    return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile") if f in have]


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The checkout's commit (with ``+dirty`` when it has uncommitted changes); None outside git."""
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True,  # noqa: E731
                                        timeout=5, check=True).stdout.strip()
        head = run("rev-parse", "--short=12", "HEAD")
        return head + ("+dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    """The CPU (model name, the ISA torch dispatches to, the flags that decide our kernels), versions, commit."""
    import transformers

    info = dict(cpu=cpu_name(), isa=torch.backends.cpu.get_cpu_capability(), cpu_flags=cpu_flags(),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                transformers=transformers.__version__, python=platform.python_version(),
                platform=platform.platform(), commit=git_commit())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def data_dir() -> Path:
    """The project's shared prompt and evaluation data: ``$EAGLE2_DATA``, else ``<repo>/../shared/data``."""
    env = os.environ.get("EAGLE2_DATA")
    return Path(env).expanduser() if env else REPO.parent / "shared" / "data"

"""Which machine a figure came from: a benchmark number without its device is meaningless."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch
from pydantic import BaseModel

from fcn_core.hardware import cpu_model


class MachineInfo(BaseModel):
    device: str  # "cpu" or "cuda"
    device_name: str  # CPU model or GPU name
    cpu_model: str
    cpu_cores: int
    torch_threads: int
    memory_gib: float
    torch: str
    cuda: str | None
    python: str
    load_average: tuple[float, float, float] | None

    @property
    def slug(self) -> str:
        """Short tag for result file names: 'cpu' or e.g. 'cuda-h100'."""
        if self.device == "cpu":
            return "cpu"
        words = [w for w in self.device_name.lower().replace("nvidia", "").split() if w]
        return "cuda-" + (words[0] if words else "gpu")


def memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return 0.0


def describe(device: str) -> MachineInfo:
    dev = torch.device(device)
    cuda = dev.type == "cuda" and torch.cuda.is_available()
    cpu = cpu_model()
    try:
        load = tuple(round(v, 2) for v in os.getloadavg())
    except OSError:
        load = None
    return MachineInfo(
        device=dev.type,
        device_name=torch.cuda.get_device_name(dev) if cuda else cpu,
        cpu_model=cpu,
        cpu_cores=os.cpu_count() or 1,
        torch_threads=torch.get_num_threads(),
        memory_gib=memory_gib(),
        torch=torch.__version__,
        cuda=torch.version.cuda if cuda else None,
        python=platform.python_version(),
        load_average=load,
    )


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"

"""What a measurement ran on: OS, CPU, cores, load average, torch (version, threads, GPU).

Every report that names the machine asks here, so they all name it alike. torch is imported only by the
functions that need it (the gateway's load test does not).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    """The 1-minute load average now (None where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine() -> str:
    """One line: 'Linux x86_64, <CPU>, 2 cores, load average 1.3'."""
    load = load_average()
    return (f"{platform.system()} {platform.machine()}, {cpu_model()}, {os.cpu_count()} cores"
            + (f", load average {load:.1f}" if load is not None else ""))


def torch_version() -> str:
    import torch

    return torch.__version__


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def measuring_machine(device: str) -> str:
    """machine(), the GPU on a cuda device, and torch's threads in this process (a cost model's)."""
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""
    return f"{machine()}{gpu}, {torch.get_num_threads()} torch threads"


def machine_fields() -> dict:
    """The same as fields (platform, cpu, cores, torch, torch_threads, python, load_avg_start)."""
    import torch

    return {
        "platform": platform.platform(), "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "load_avg_start": load_average(),
    }

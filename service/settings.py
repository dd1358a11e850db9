"""Every knob of the service, read from ``FCN_*`` environment variables (or a ``.env`` file).

Queue policy, limits and precision are configuration rather than code, so an operator can
tune a replica for its GPU and its clients without a release. ``Settings.table()`` renders
the documentation of every field, so the README cannot drift from the code.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WEIGHTS = Path("weights/fcn8s-lite0-camvid.safetensors")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FCN_", extra="ignore", validate_default=True)

    weights: Path = Field(
        DEFAULT_WEIGHTS,
        description="Weights file to serve. A relative path is looked up in the working "
        "directory, then in the repository/package root.",
    )
    device: str = Field(
        "auto", description="`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`."
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Autocast precision on CUDA (`bf16`/`fp16`); the CPU always runs fp32.",
    )
    max_batch_size: int = Field(
        0,
        ge=0,
        description="Most images in one forward pass (0: 8 on CUDA; on the CPU the worker "
        "count, as batching does not make CPU convolutions faster).",
    )
    max_batch_pixels: int = Field(
        4 * 1024 * 1024,
        ge=1,
        description="Pixel budget of one batch, counted on the padded bucket "
        "(an image above it still runs, alone).",
    )
    max_queue_delay_ms: float = Field(
        5.0,
        ge=0,
        description="Longest an image waits for batch-mates, timed from its arrival in the "
        "queue (time spent behind a running batch counts).",
    )
    max_queue_size: int = Field(
        64, ge=1, description="Queued images; beyond it requests get 503 with Retry-After."
    )
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Deadline from arrival; a request not computed by then gets 504 "
        "(and is dropped before compute).",
    )
    max_body_bytes: int = Field(
        20 * 1024 * 1024,
        ge=1,
        description="Request body limit; larger bodies get 413 while streaming.",
    )
    max_image_pixels: int = Field(
        50_000_000,
        ge=1,
        description="Pixel limit read from the image header, before decoding (413 above it).",
    )
    max_side: int = Field(
        2048,
        ge=32,
        description="Longer image sides are downscaled to this before inference; "
        "the label map is scaled back to the original size (nearest).",
    )
    max_images_per_request: int = Field(
        16, ge=1, description="Most images in one `POST /segment/batch`."
    )
    bucket_multiple: int = Field(
        32,
        ge=1,
        description="Images are padded to multiples of this so that different sizes batch "
        "together. 32 is the EfficientNet-Lite0 model's own padding, so labels are exactly "
        "those of the image run alone; for VGG16 padding shifts border pixels slightly, and 1 "
        "batches equal sizes only.",
    )
    codec_threads: int = Field(
        0,
        ge=0,
        description="Threads that decode and encode images, off the event loop "
        "(0: min(4, CPU count)).",
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="CPU threads for torch (0: one per worker when the CPU runs several "
        "workers, else torch's default).",
    )
    channels_last: bool = Field(
        False,
        description="Run convolutions on NHWC (channels-last) tensors: faster with cuDNN "
        "tensor cores and oneDNN; `fcn-bench` measures it per device.",
    )
    compile: bool = Field(
        False,
        description="`torch.compile` the model (static shapes). The warm-up compiles each "
        "size of `FCN_WARMUP_SIZES` at batch sizes 1, 2, 4, ... up to the full batch, and "
        "batches of those buckets are rounded up to one of them, so serving never compiles; "
        "list the sizes clients send.",
    )
    compile_mode: Literal[
        "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = Field(
        "default",
        description="The `torch.compile` mode when `FCN_COMPILE` is on. `reduce-overhead` "
        "replays a CUDA graph per bucket and batch size (the warm-up records them), which "
        "removes the per-kernel launch cost of small batches.",
    )
    cudnn_benchmark: bool = Field(
        True,
        description="CUDA: cuDNN times its algorithms once per input shape; pays off because "
        "size buckets keep the shapes few.",
    )
    decode_on_device: bool = Field(
        False,
        description="Decode JPEGs on the model's device (nvJPEG on CUDA, via "
        "`torchvision.io.decode_jpeg`), a batch at a time, when the answer needs no pixels "
        "(label maps, JSON); the codec threads then only check headers. Other formats, "
        "CMYK, images to downscale and overlays decode on the CPU as usual.",
    )
    pipeline_depth: int = Field(
        2,
        ge=1,
        le=8,
        description="Batches in flight at once. With 2, the next batch is padded, copied in "
        "(pinned memory, a CUDA stream of its own) and queued while the device still runs "
        "the current one, and the finished one is cropped and answered beside both; 1 runs "
        "batches strictly one after another.",
    )
    cpu_workers: int = Field(
        0,
        ge=0,
        description="CPU only: a batch's images run as parallel single-image forward passes "
        "on this many threads, each with one torch thread; on CPUs that beats both batching "
        "and intra-op threads (0: one per core this process may use, after its affinity mask "
        "and a cgroup CPU quota).",
    )
    api_key: SecretStr | None = Field(
        None,
        description="When set, `/segment*` and `/v1/model` need `Authorization: Bearer <key>`; "
        "health, readiness and metrics stay open.",
    )
    warmup: bool = Field(True, description="Run the warm-up shapes before reporting ready.")
    warmup_sizes: str = Field(
        "480x360",
        description="Comma-separated warm-up image sizes `WxH`, each run at batch 1 and at "
        "the full batch for its bucket.",
    )
    shutdown_timeout_s: float = Field(
        10.0, ge=0, description="On shutdown, in-flight requests get this long to finish."
    )
    trivial_model: bool = Field(
        False,
        description="Serve a near-free stand-in model (no weights file) to measure the "
        "HTTP/codec ceiling.",
    )

    @field_validator("warmup_sizes")
    @classmethod
    def _sizes_parse(cls, sizes: str) -> str:
        for size in _split(sizes):
            parse_size(size)
        return sizes

    @field_validator("device")
    @classmethod
    def _device_known(cls, device: str) -> str:
        if device != "auto" and device != "cpu" and not device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {device!r}")
        return device

    def resolved_weights(self) -> Path:
        """The weights path as given if it exists, else under the package root."""
        path = self.weights.expanduser()
        if path.is_absolute() or path.exists():
            return path
        beside_package = PACKAGE_ROOT / path
        return beside_package if beside_package.exists() else path

    def resolved_cpu_workers(self, device_type: str) -> int:
        if device_type != "cpu":
            return 1
        return self.cpu_workers or usable_cores()

    def resolved_max_batch_size(self, device_type: str) -> int:
        if self.max_batch_size:
            return self.max_batch_size
        return 8 if device_type != "cpu" else self.resolved_cpu_workers(device_type)

    def resolved_torch_threads(self, device_type: str) -> int:
        """Threads to set, or 0 to leave torch's default."""
        if self.torch_threads:
            return self.torch_threads
        return 1 if self.resolved_cpu_workers(device_type) > 1 else 0

    def resolved_codec_threads(self) -> int:
        return self.codec_threads or min(4, os.cpu_count() or 1)

    def warmup_shapes(self) -> list[tuple[int, int]]:
        """(height, width) pairs."""
        return [parse_size(s) for s in _split(self.warmup_sizes)]

    @classmethod
    def table(cls) -> str:
        """Markdown table of every setting: variable, default, meaning."""
        rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
        for name, field in cls.model_fields.items():
            default = field.get_default(call_default_factory=True)
            shown = "unset" if default is None else f"`{default}`"
            rows.append(f"| `FCN_{name.upper()}` | {shown} | {field.description} |")
        return "\n".join(rows)


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may use: its affinity mask (a container's cpuset), cut by a cgroup v2
    CPU quota (``docker run --cpus``, a Kubernetes CPU limit), which the mask does not show."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to read
    return cores


def _split(sizes: str) -> list[str]:
    return [s.strip() for s in sizes.split(",") if s.strip()]


def parse_size(text: str) -> tuple[int, int]:
    """``"480x360"`` (width x height) -> ``(360, 480)`` (height, width)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must look like 480x360 (width x height), not {text!r}") from None
    if w < 1 or h < 1:
        raise ValueError(f"size must be positive, not {text!r}")
    return h, w

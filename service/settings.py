"""Every knob of the service, read from ``FCN_*`` environment variables (or a ``.env`` file).

Queue policy, limits and precision are configuration rather than code, so an operator can
tune a replica for its GPU and its clients without a release. ``Settings.table()`` renders
the documentation of every field, so the README cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fcn_core.backends import BackendName
from fcn_core.inference import CompileMode, InferenceConfig, Precision
from fcn_core.shipped import DEFAULT_WEIGHTS_NAME, default_weights_dir
from fcn_core.tiling import TileMode, TilePolicy
from service.batcher import QueuePolicy

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WEIGHTS = Path("weights") / DEFAULT_WEIGHTS_NAME


T = TypeVar("T")

INFERENCE = InferenceConfig()
QUEUE = QueuePolicy()
TILE = TilePolicy()
"""Defaults are written once, in the components; the fields below take theirs from these."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FCN_", extra="ignore", validate_default=True)

    weights: Path = Field(
        DEFAULT_WEIGHTS,
        description="One weights file to serve, alone, under its file stem. A relative path "
        "is looked up in the working directory, then in the repository root, then among the "
        "shipped weights (a wheel install carries them), by file name. Unset: the models of "
        "`FCN_MODELS`, else of `FCN_MODEL_REPOSITORY` (the default is then the model of this "
        "default file, and `--local` runs it).",
    )
    models: str = Field(
        "",
        description="Comma-separated weights files to serve, each under its file stem or as "
        "`name=path` (paths looked up as for `FCN_WEIGHTS`); used when `FCN_WEIGHTS` is unset.",
    )
    model_repository: str = Field(
        "",
        description="A folder whose `*.safetensors` files are served, each under its file "
        "stem, when neither `FCN_WEIGHTS` nor `FCN_MODELS` is set (empty: the shipped "
        "weights). Files added, replaced or removed are loaded, swapped or unloaded without "
        "downtime (see `FCN_REPOSITORY_POLL_S`).",
    )
    default_model: str = Field(
        "",
        description="The model of requests that name none (empty: the `FCN_WEIGHTS` file's, "
        "else the shipped default's if served, else the first by name).",
    )
    repository_poll_s: float = Field(
        5.0,
        ge=0,
        description="How often the repository folder is checked for changed weights files "
        "(0: never; `POST /v2/repository/models/{name}/load` still reloads).",
    )
    device: str = Field(
        INFERENCE.device,
        description="`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`.",
    )
    backend: BackendName = Field(
        INFERENCE.backend,
        description="What runs the network: `torch`, `onnxruntime` or `openvino` (the ONNX "
        "ones on the CPU, from an export cached under `FCN_CACHE_DIR`), or `auto`: the "
        "fastest installed one for the device, from `fcn-bench` (see the README).",
    )
    cache_dir: str = Field(
        INFERENCE.cache_dir,
        description="Where exports of the weights are cached, by content hash "
        "(empty: `~/.cache/fcn-serve`); `fcn-export` fills the same cache.",
    )
    precision: Precision = Field(
        INFERENCE.precision,
        description="Autocast precision on CUDA (`bf16`/`fp16`); the CPU runs fp32, except "
        "OpenVINO, which runs `bf16` when asked (it changes a few labels: measure first).",
    )
    max_batch_size: int = Field(
        INFERENCE.max_batch_size,
        ge=0,
        description="Most images in one forward pass (0: 8 on CUDA; on the CPU the worker "
        "count, as batching does not make CPU convolutions faster).",
    )
    max_batch_pixels: int = Field(
        INFERENCE.max_batch_pixels,
        ge=1,
        description="Pixel budget of one batch, counted on the padded bucket "
        "(an image above it still runs, alone).",
    )
    max_queue_delay_ms: float = Field(
        QUEUE.max_queue_delay_ms,
        ge=0,
        description="Longest an image waits for batch-mates, timed from its arrival in the "
        "queue (time spent behind a running batch counts); it waits only while other requests "
        "for its model are on their way (being read or decoded).",
    )
    max_queue_size: int = Field(
        QUEUE.max_queue_size,
        ge=1,
        description="Queued images; beyond it requests get 503 with Retry-After.",
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
        description="The longest side one pass takes: a longer image is segmented in tiles "
        "(`FCN_TILE`) or, with tiling off or when it fits one tile, downscaled to this and "
        "its label map scaled back to the original size (nearest).",
    )
    tile: TileMode = Field(
        TILE.mode,
        description="Images too large for one pass: `auto` segments an image whose longer "
        "side exceeds `FCN_MAX_SIDE` (and a tile) at full resolution, in overlapping tiles "
        "blended into one label map, instead of downscaling it; `on` tiles every image "
        "larger than a tile; `off` downscales to `FCN_MAX_SIDE`. With `auto` or `on`, a request "
        "may choose with `?tile=` (the protocol routes: the `tile` parameter); with `off`, "
        "requests cannot turn tiling on.",
    )
    tile_size: int = Field(
        TILE.size,
        ge=32,
        description="A tile's side in pixels, a multiple of `FCN_BUCKET_MULTIPLE`. Tiles run "
        "through the batcher like images, as many per batch as `FCN_MAX_BATCH_PIXELS` allows "
        "(one at least).",
    )
    tile_overlap: int = Field(
        TILE.overlap,
        ge=0,
        description="Pixels that neighbouring tiles share (under half a tile); their scores "
        "are blended with weights falling towards each tile's edges, so no seam shows.",
    )
    tile_max_pixels: int = Field(
        TILE.max_pixels,
        ge=1,
        description="Pixel limit of an image segmented in tiles, in place of "
        "`FCN_MAX_IMAGE_PIXELS` (read from the header; 413 above it). One tiled image per "
        "model is blended at a time, so its memory (about 4 bytes x classes x tile side x "
        "image width, besides the image) is bounded.",
    )
    max_images_per_request: int = Field(
        16, ge=1, description="Most images in one `POST /segment/batch`."
    )
    bucket_multiple: int = Field(
        INFERENCE.bucket_multiple,
        ge=1,
        description="Images are padded to multiples of this so that different sizes batch "
        "together. 32 is the EfficientNet-Lite0 and MobileNetV2 models' own padding, so labels "
        "are exactly those of the image run alone; for VGG16 padding shifts border pixels "
        "slightly, a larger multiple changes some of the MobileNetV2 model's labels anywhere "
        "(its image pooling averages the padding too), and 1 batches equal sizes only.",
    )
    codec_threads: int = Field(
        0,
        ge=0,
        description="Threads that decode and encode images, off the event loop "
        "(0: min(4, CPU count)).",
    )
    torch_threads: int = Field(
        INFERENCE.torch_threads,
        ge=0,
        description="Intra-op threads of one CPU forward pass, any backend (0: one on each "
        "worker when a batch's images run in parallel, every usable core for an image run "
        "alone).",
    )
    channels_last: bool | Literal["auto"] = Field(
        INFERENCE.channels_last,
        description="Run torch's convolutions on NHWC (channels-last) tensors; `auto`: on "
        "the CPU (oneDNN: 1.2-1.5x faster here), off on CUDA until measured there (`fcn-bench` "
        "measures both per device).",
    )
    compile: bool = Field(
        INFERENCE.compile,
        description="`torch.compile` the model (static shapes). The warm-up compiles each "
        "size of `FCN_WARMUP_SIZES` at batch sizes 1, 2, 4, ... up to the full batch, and "
        "batches of those buckets are rounded up to one of them, so serving never compiles; "
        "list the sizes clients send.",
    )
    compile_mode: CompileMode = Field(
        INFERENCE.compile_mode,
        description="The `torch.compile` mode when `FCN_COMPILE` is on. `reduce-overhead` "
        "replays a CUDA graph per bucket and batch size (the warm-up records them), which "
        "removes the per-kernel launch cost of small batches.",
    )
    cudnn_benchmark: bool = Field(
        INFERENCE.cudnn_benchmark,
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
        QUEUE.pipeline_depth,
        ge=1,
        le=8,
        description="Batches in flight at once. With 2, the next batch is padded, copied in "
        "(pinned memory, a CUDA stream of its own) and queued while the device still runs "
        "the current one, and the finished one is cropped and answered beside both; 1 runs "
        "batches strictly one after another.",
    )
    cpu_workers: int = Field(
        INFERENCE.cpu_workers,
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

    @model_validator(mode="after")
    def _tiles_fit(self) -> Settings:
        self.tile_policy()  # its own checks (the overlap)
        if self.tile_size % self.bucket_multiple:
            raise ValueError(
                f"FCN_TILE_SIZE {self.tile_size} must be a multiple of FCN_BUCKET_MULTIPLE "
                f"{self.bucket_multiple}"
            )
        return self

    @field_validator("device")
    @classmethod
    def _device_known(cls, device: str) -> str:
        if device != "auto" and device != "cpu" and not device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {device!r}")
        return device

    def resolved_weights(self) -> Path:
        """The weights path as given if it exists, else under the repository root, else the
        shipped file of that name; as given (for the error message) when none exists."""
        return self._resolve(self.weights)

    @staticmethod
    def _resolve(path: Path) -> Path:
        path = path.expanduser()
        if path.is_absolute() or path.exists():
            return path
        for candidate in (PACKAGE_ROOT / path, default_weights_dir() / path.name):
            if candidate.exists():
                return candidate
        return path

    def single_weights(self) -> bool:
        """Whether ``FCN_WEIGHTS`` was set: that file is then the only model."""
        return "weights" in self.model_fields_set

    def repository_watched(self) -> bool:
        """The models are a folder's files (neither FCN_WEIGHTS nor FCN_MODELS)."""
        return not self.single_weights() and not self.models.strip()

    def resolved_repository(self) -> Path | None:
        if not self.repository_watched():
            return None
        folder = Path(self.model_repository).expanduser() if self.model_repository else None
        return folder or default_weights_dir()

    def model_sources(self) -> dict[str, Path]:
        """Model name -> weights file, as configured (see ``FCN_WEIGHTS``, ``FCN_MODELS``,
        ``FCN_MODEL_REPOSITORY``). Raises ``ValueError`` when that names no model."""
        if self.single_weights():
            path = self.resolved_weights()
            return {path.stem: path}
        if self.models.strip():
            sources: dict[str, Path] = {}
            for entry in _split(self.models):
                name, _, where = entry.rpartition("=")
                path = self._resolve(Path(where))
                sources[name or path.stem] = path
            return sources
        folder = self.resolved_repository()
        assert folder is not None
        if not folder.is_dir():
            raise ValueError(f"the model repository {folder} is not a folder")
        return {p.stem: p for p in sorted(folder.glob("*.safetensors"))}

    def resolved_default_model(self, names: list[str]) -> str:
        if not names:
            raise ValueError("no models to serve: the repository holds no *.safetensors file")
        if self.default_model:
            if self.default_model not in names:
                raise ValueError(f"FCN_DEFAULT_MODEL {self.default_model!r} is not among {names}")
            return self.default_model
        preferred = self.resolved_weights().stem
        return preferred if preferred in names else sorted(names)[0]

    def inference(self) -> InferenceConfig:
        """How to run the model: the fields the inference core shares with --local and bulk.
        The trivial model measures the service's own overhead, so it always runs on torch."""
        config = self._config(InferenceConfig)
        return dataclasses.replace(config, backend="torch") if self.trivial_model else config

    def tile_policy(self, mode: TileMode | None = None) -> TilePolicy:
        """How images too large for one pass are segmented; ``mode`` (a request's ``?tile=``)
        overrides ``FCN_TILE``, except that an operator's ``off`` stays off: tiled images
        take more pixels, memory and time than the operator allowed."""
        chosen = "off" if self.tile == "off" else mode or self.tile
        return TilePolicy(chosen, self.tile_size, self.tile_overlap, self.tile_max_pixels)

    def queue_policy(self) -> QueuePolicy:
        return self._config(QueuePolicy)

    def _config(self, cls: type[T]) -> T:
        """A component's frozen config dataclass, its fields read from these settings."""
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})

    def resolved_codec_threads(self) -> int:
        return self.codec_threads or min(4, os.cpu_count() or 1)

    def warmup_shapes(self) -> list[tuple[int, int]]:
        """(height, width) pairs; a compiled model also warms a full tile when tiling may
        apply, so that the first large image does not compile (or record a CUDA graph) while
        serving. Tiles at an image's edges may be narrower and still meet a cold shape."""
        shapes = [parse_size(s) for s in _split(self.warmup_sizes)]
        if self.compile and self.tile != "off":
            shapes.append((self.tile_size, self.tile_size))
        return shapes

    @classmethod
    def table(cls) -> str:
        """Markdown table of every setting: variable, default, meaning."""
        rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
        for name, field in cls.model_fields.items():
            default = field.get_default(call_default_factory=True)
            shown = "unset" if default is None else f"`{default}`"
            rows.append(f"| `FCN_{name.upper()}` | {shown} | {field.description} |")
        return "\n".join(rows)


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

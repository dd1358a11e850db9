"""The ceiling: what the model alone does on the device, with no HTTP, queue or codec.

Each case times the device work the service must do per batch (normalise a uint8 batch that
is already on the device, forward, argmax to uint8 labels), so the service's throughput can
be read as a fraction of it. Achieved TFLOP/s come from a FLOP count of the model
(``torch.utils.flop_counter`` on the meta device: exact for the convolutions, no forward run),
and the GPU's own dense matmul rate is measured beside it, so "40 % of peak" means the peak of
this machine, not a datasheet.

    python -m bench.model --backbone efficientnet_lite0 --sizes 480x360 --batches 1,4
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fcn_core.backends import Network, build_network, choose_backend
from fcn_core.final_upsampling import FinalUpsampling, served_network
from fcn_core.inference import usable_cores
from fcn_core.models import build_model, grouped_upsampling
from fcn_core.models.backbones import default_normalization
from fcn_core.preprocess import Normalization
from fcn_core.weights import WeightsMetadata, load_weights
from service.settings import parse_size

from .images import DEFAULT_DATA_ROOT, photos_of_size
from .machine import MachineInfo, default_device, describe

DEFAULT_THREADS = torch.get_num_threads()  # read before anything changes it
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


class ModelCase(BaseModel):
    width: int
    height: int
    batch: int
    precision: str = "fp32"
    channels_last: bool = False
    compiled: bool = False
    threads: int = 0  # intra-op threads on the CPU; 0: torch's default (the core count)
    backend: str = "torch"  # fcn_core.backends: what runs the network


class ModelResult(ModelCase):
    gflop_per_image: float
    iters: int
    images_per_s: float
    batch_ms_p50: float
    batch_ms_min: float
    achieved_tflops: float
    compile_s: float | None = None  # first call under torch.compile (tracing + codegen)


class AgreementResult(BaseModel):
    """Share of pixels whose label at reduced precision, or on another backend, equals
    torch's fp32 label."""

    precision: str
    backend: str = "torch"
    images: int
    pixels: int
    agreement: float


class ModelReport(BaseModel):
    machine: MachineInfo
    arch: str
    backbone: str
    num_classes: int
    weights: str  # the file, or a note that the weights are untrained
    what_is_timed: str = (
        "uint8 batch on device -> normalise -> forward (the case's backend) -> labels as the "
        "service makes them (on the CPU from the coarse scores, fcn_core.final_upsampling; "
        "else max(1).indices) -> uint8"
    )
    compile_mode: str = "default"
    cudnn_benchmark: bool = False
    matmul_tflops: dict[str, float]
    results: list[ModelResult]
    agreement: list[AgreementResult]


def model_gflop(arch: str, backbone: str, num_classes: int, height: int, width: int) -> float:
    """GFLOP (2 x multiply-adds) of one forward pass on one image, counted on the meta device."""
    with torch.device("meta"):
        model = build_model(arch, num_classes, backbone)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(1, 3, height, width, device="meta"))
    return counter.get_total_flops() / 1e9


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """fp32 is autocast disabled, so every case runs through the same code."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def device_step(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    normalization: Normalization,
    precision: str,
    channels_last: bool,
    final: FinalUpsampling | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 N x 3 x H x W on the device -> uint8 N x H x W labels, as the service's runner:
    with ``final``, ``model`` gives coarse scores and ``final`` finishes the labels."""

    def step(images: torch.Tensor) -> torch.Tensor:
        x = normalization(images)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(images.device, precision):
            out = model(x)
        return final.labels(out, x.shape[-2:]) if final else class_labels(out)

    return step


class Backends:
    """The networks of the other backends for one model, built once (an export is cached by
    the weights' hash, so only a new file pays for it)."""

    def __init__(self, model: nn.Module, meta: WeightsMetadata | None) -> None:
        self.model, self.meta = model, meta
        self._networks: dict[str, Network] = {}

    def runner(self, backend: str, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """A normalised batch -> logits on ``backend`` with ``threads`` cores (0: all)."""
        if backend not in self._networks:
            device = torch.device("cpu")
            chosen = choose_backend(backend, device, self.meta)
            cores = usable_cores()
            self._networks[backend] = build_network(
                chosen, self.model, self.meta, device, workers=cores, cores=cores
            )
        network = self._networks[backend]
        return lambda x: network(x, threads or usable_cores())


def class_labels(logits: torch.Tensor) -> torch.Tensor:
    """N x C x H x W logits -> N x H x W uint8 labels, the first maximum on ties (as argmax).

    ``max(1).indices`` rather than ``argmax(1)``: on the CPU, torch's argmax over a non-inner
    dimension takes a slow path (about 15x slower here: 34 ms vs 2 ms for 11 x 384 x 480).
    """
    return logits.max(1).indices.to(torch.uint8)


def input_batch(images: Sequence[np.ndarray], batch: int, device: torch.device) -> torch.Tensor:
    """``batch`` real photos (cycled) as a uint8 N x 3 x H x W tensor on the device."""
    picked = [images[i % len(images)] for i in range(batch)]
    x = torch.from_numpy(np.stack(picked)).permute(0, 3, 1, 2).contiguous()
    return x.to(device)


def time_step(
    step: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    warmup: int,
    iters: int,
    max_seconds: float,
) -> tuple[list[float], float]:
    """Per-batch seconds (synchronised), and the seconds of the first (warm-up) call."""
    device = x.device
    with torch.inference_mode():
        t0 = time.perf_counter()
        step(x)
        synchronize(device)
        first = time.perf_counter() - t0
        for _ in range(max(0, warmup - 1)):
            step(x)
        synchronize(device)
        times: list[float] = []
        deadline = time.perf_counter() + max_seconds
        while len(times) < iters and (not times or time.perf_counter() < deadline):
            t0 = time.perf_counter()
            step(x)
            synchronize(device)
            times.append(time.perf_counter() - t0)
    return times, first


def run_case(
    model: nn.Module,
    normalization: Normalization,
    case: ModelCase,
    images: Sequence[np.ndarray],
    gflop: float,
    *,
    warmup: int = 2,
    iters: int = 10,
    max_seconds: float = 10.0,
    compile_mode: str = "default",
    backends: Backends | None = None,
    final: FinalUpsampling | None = None,
) -> ModelResult:
    """``model``: the network as served (coarse scores when ``final`` finishes them)."""
    device = next(model.parameters()).device
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    runnable: nn.Module | Callable[[torch.Tensor], torch.Tensor] = (
        torch.compile(model, dynamic=False, mode=compile_mode) if case.compiled else model
    )
    if case.backend != "torch":
        if backends is None:
            raise ValueError(f"the {case.backend} case needs the weights' backends")
        runnable = backends.runner(case.backend, case.threads)
    step = device_step(runnable, normalization, case.precision, case.channels_last, final)
    x = input_batch(images, case.batch, device)
    with intra_op_threads(case.threads):
        times, first = time_step(step, x, warmup=warmup, iters=iters, max_seconds=max_seconds)
    total = sum(times)
    ips = case.batch * len(times) / total
    return ModelResult(
        **case.model_dump(),
        gflop_per_image=round(gflop, 3),
        iters=len(times),
        images_per_s=round(ips, 3),
        batch_ms_p50=round(statistics.median(times) * 1e3, 3),
        batch_ms_min=round(min(times) * 1e3, 3),
        achieved_tflops=round(ips * gflop / 1e3, 4),
        compile_s=round(first, 2) if case.compiled else None,
    )


def label_agreement(
    model: nn.Module,
    normalization: Normalization,
    images: Sequence[np.ndarray],
    precision: str,
) -> AgreementResult:
    """Per-pixel agreement of the labels at ``precision`` with fp32, one image at a time."""
    device = next(model.parameters()).device
    fp32 = device_step(model, normalization, "fp32", False)
    low = device_step(model, normalization, precision, False)
    same = pixels = 0
    with torch.inference_mode():
        for img in images:
            x = input_batch([img], 1, device)
            same += int((fp32(x) == low(x)).sum())
            pixels += img.shape[0] * img.shape[1]
    return AgreementResult(
        precision=precision, images=len(images), pixels=pixels, agreement=same / pixels
    )


def backend_agreement(
    model: nn.Module,
    normalization: Normalization,
    images: Sequence[np.ndarray],
    backends: Backends,
    backend: str,
    final: FinalUpsampling | None = None,
) -> AgreementResult:
    """Per-pixel agreement of ``backend``'s labels as served (``final``: finished from its
    coarse scores) with torch's fp32 ones from the full ``model``, image by image."""
    torch_step = device_step(model, normalization, "fp32", False)
    other = device_step(backends.runner(backend, 0), normalization, "fp32", False, final)
    same = pixels = 0
    with torch.inference_mode():
        for img in images:
            x = input_batch([img], 1, torch.device("cpu"))
            same += int((torch_step(x) == other(x)).sum())
            pixels += img.shape[0] * img.shape[1]
    return AgreementResult(
        precision="fp32",
        backend=backend,
        images=len(images),
        pixels=pixels,
        agreement=same / pixels,
    )


def matmul_tflops(device: torch.device, precision: str, seconds: float = 1.0) -> float:
    """Measured dense matmul rate: the realistic peak the model's TFLOP/s is compared with."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = PRECISIONS[precision] or torch.float32
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    synchronize(device)
    count, t0 = 0, time.perf_counter()
    while True:
        a @ b
        count += 1
        if count % 4 == 0:
            synchronize(device)
            if time.perf_counter() - t0 >= seconds:
                break
    return round(2 * n**3 * count / (time.perf_counter() - t0) / 1e12, 3)


def load_model(
    weights: Path | None, arch: str, backbone: str, num_classes: int, device: torch.device
) -> tuple[nn.Module, Normalization, str, WeightsMetadata | None]:
    """The weights' model when a file is given, else an untrained one (same cost per pixel),
    as the service runs it (``grouped_upsampling``); the note says which, and the metadata is
    the file's (None when untrained)."""
    if weights is not None:
        loaded = load_weights(weights, device)
        served = grouped_upsampling(loaded.model)
        return served, loaded.meta.normalization, str(weights), loaded.meta
    model = randomise_scores(build_model(arch, num_classes, backbone)).to(device).eval()
    model = grouped_upsampling(model)
    note = "untrained (random backbone and score layers): timing; agreement is indicative only"
    return model, default_normalization(backbone), note, None


def randomise_scores(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Untrained FCNs have zero score layers (as in the paper) and predict class 0 everywhere,
    which would make any precision agree with fp32 trivially; random scores make labels vary."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.startswith("score") and isinstance(module, nn.Conv2d):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
    return model


@contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """On a CPU shared with other work, intra-op threads wait on each other at every op's
    barrier; one thread can be several times faster than the core count, so it is swept."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or DEFAULT_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sweep_cases(
    sizes: Iterable[tuple[int, int]],  # (height, width), as parse_size reads "WxH"
    batches: Iterable[int],
    precisions: Iterable[str],
    channels_last: Iterable[bool],
    compiled: Iterable[bool],
    threads: Iterable[int] = (0,),
    backend: str = "torch",
) -> list[ModelCase]:
    return [
        ModelCase(
            width=w,
            height=h,
            batch=b,
            precision=p,
            channels_last=cl,
            compiled=c,
            threads=t,
            backend=backend,
        )
        for (h, w), b, p, cl, c, t in itertools.product(
            sizes, batches, precisions, channels_last, compiled, threads
        )
    ]


def backend_cases(
    sizes: Iterable[tuple[int, int]],
    batches: Iterable[int],
    threads: Iterable[int],
    backends: Iterable[str],
) -> list[ModelCase]:
    """fp32 cases of the non-torch backends (layout and compilation are torch's knobs)."""
    sizes, batches, threads = list(sizes), list(batches), list(threads)
    return [
        case
        for b in backends
        if b != "torch"
        for case in sweep_cases(sizes, batches, ["fp32"], [False], [False], threads, backend=b)
    ]


def run_sweep(
    cases: Sequence[ModelCase],
    *,
    device: str,
    weights: Path | None = None,
    arch: str = "fcn8s",
    backbone: str = "efficientnet_lite0",
    num_classes: int = 11,
    warmup: int = 2,
    iters: int = 10,
    max_seconds: float = 10.0,
    data_root: Path = DEFAULT_DATA_ROOT,
    agreement_images: int = 4,
    compile_mode: str = "default",
    cudnn_benchmark: bool = True,
    log: Callable[[str], None] = print,
) -> ModelReport:
    """``cudnn_benchmark`` picks the fastest convolution algorithm per shape (CUDA only),
    which pays off because a served model sees few shapes (32-pixel buckets)."""
    dev = torch.device(device)
    cudnn = dev.type == "cuda" and cudnn_benchmark
    torch.backends.cudnn.benchmark = cudnn
    model, norm, note, meta = load_model(weights, arch, backbone, num_classes, dev)
    if meta is not None:
        arch, backbone, num_classes = meta.arch, meta.backbone, meta.num_classes
    # On the CPU the service runs the network up to its coarse scores and finishes the
    # labels from them; time that, on every backend.
    network, final = served_network(model, coarse=dev.type == "cpu")
    others = Backends(network, meta) if dev.type == "cpu" else None
    photos: dict[tuple[int, int], list[np.ndarray]] = {}  # (h, w) -> photos of that size
    gflops: dict[tuple[int, int], float] = {}
    results = []
    for case in cases:
        key = (case.height, case.width)
        if key not in photos:
            photos[key] = photos_of_size(key, 8, data_root)
            gflops[key] = model_gflop(arch, backbone, num_classes, case.height, case.width)
        r = run_case(
            network,
            norm,
            case,
            photos[key],
            gflops[key],
            warmup=warmup,
            iters=iters,
            max_seconds=max_seconds,
            compile_mode=compile_mode,
            backends=others,
            final=final,
        )
        log(
            f"{case.width}x{case.height} b{case.batch} {case.backend} {case.precision}"
            f"{' cl' if case.channels_last else ''}{' compiled' if case.compiled else ''}"
            f"{f' {case.threads}T' if case.threads else ''}: "
            f"{r.images_per_s:.2f} img/s, {r.batch_ms_p50:.1f} ms/batch, "
            f"{r.achieved_tflops:.3f} TFLOP/s"
        )
        results.append(r)
    network.to(memory_format=torch.contiguous_format)
    low = sorted({c.precision for c in cases} - {"fp32"})
    agreement = []
    other_backends = sorted({c.backend for c in cases} - {"torch"})
    if (low or other_backends) and agreement_images:
        imgs = photos_of_size(next(iter(photos)), agreement_images, data_root)
        agreement = [label_agreement(model, norm, imgs, p) for p in low]
        if others is not None:
            agreement += [
                backend_agreement(model, norm, imgs, others, b, final) for b in other_backends
            ]
    peaks = {p: matmul_tflops(dev, p) for p in ["fp32", *low]}
    return ModelReport(
        machine=describe(device),
        arch=arch,
        backbone=backbone,
        num_classes=num_classes,
        weights=note,
        matmul_tflops=peaks,
        results=results,
        agreement=agreement,
        compile_mode=compile_mode,
        cudnn_benchmark=cudnn,
    )


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _onoff(text: str) -> list[bool]:
    table = {"off": False, "on": True}
    try:
        return [table[t] for t in _csv(text)]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected off, on or off,on, not {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=default_device())
    p.add_argument("--weights", type=Path, help="weights file; default: untrained model")
    p.add_argument("--arch", default="fcn8s")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--num-classes", type=int, default=11)
    p.add_argument("--sizes", type=lambda s: [parse_size(t) for t in _csv(s)], default="480x360")
    p.add_argument("--batches", type=lambda s: [int(t) for t in _csv(s)], default="1,4")
    p.add_argument("--precisions", type=_csv, default="fp32,bf16")
    p.add_argument("--channels-last", type=_onoff, default="off,on")
    p.add_argument("--compile", type=_onoff, default="off")
    p.add_argument(
        "--threads",
        type=lambda s: [int(t) for t in _csv(s)],
        default="0",
        help="CPU intra-op thread counts to sweep (0: torch's default)",
    )
    p.add_argument(
        "--backends",
        type=_csv,
        default="torch",
        help="what runs the network, e.g. torch,onnxruntime,openvino (CPU; needs --weights)",
    )
    p.add_argument(
        "--compile-mode",
        default="default",
        help="torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune...",
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--max-seconds", type=float, default=10.0, help="per case")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    a = p.parse_args(argv)
    bad = [x for x in a.precisions if x not in PRECISIONS]
    if bad:
        p.error(f"unknown precision {bad}; choose from {', '.join(PRECISIONS)}")
    cases = sweep_cases(a.sizes, a.batches, a.precisions, a.channels_last, a.compile, a.threads)
    cases = [c for c in cases if "torch" in a.backends]
    cases += backend_cases(a.sizes, a.batches, a.threads, a.backends)
    report = run_sweep(
        cases,
        device=a.device,
        weights=a.weights,
        arch=a.arch,
        backbone=a.backbone,
        num_classes=a.num_classes,
        warmup=a.warmup,
        iters=a.iters,
        max_seconds=a.max_seconds,
        data_root=a.data_root,
        compile_mode=a.compile_mode,
    )
    text = report.model_dump_json(indent=2)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()

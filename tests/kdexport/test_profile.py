"""kdexport.profile: statistics, config validation, torch and ORT profiling on CPU, refusals, thread handling.

CUDA / TensorRT paths are skipped without a GPU (stated reason) and run where one is present.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kdexport.errors import ConfigError, KdexportError
from kdexport.profile import (
    Backend,
    BackendUnavailable,
    ProfileConfig,
    available_backends,
    environment,
    measure_module,
    measure_onnx,
    profile,
    summarize,
)

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none visible to torch)")
cpu_only = pytest.mark.skipif(CUDA, reason="checks the refusals of a CPU-only machine")
FAST = dict(warmup=1, iters=3)
RESULT_KEYS = {"batch", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "throughput_ips", "peak_rss_mb",
               "peak_cuda_mb"}
TOP_KEYS = {"schema_version", "artifact", "artifact_kind", "artifact_bytes", "backend", "device", "threads",
            "warmup", "iters", "input_size", "environment", "results", "notes"}


def conv_net(width: int = 16, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
    ).eval()


def to_onnx(model: nn.Module, path: Path, dynamic: bool = True) -> Path:
    """The legacy (TorchScript) exporter, stated explicitly, with an optional dynamic batch axis."""
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.randn(1, 3, 32, 32), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes=axes)
    return path


@pytest.fixture(scope="module")
def mobilenet_onnx(tmp_path_factory) -> Path:
    from torchvision.models import mobilenet_v2

    torch.manual_seed(0)
    return to_onnx(mobilenet_v2(num_classes=10).eval(), tmp_path_factory.mktemp("onnx") / "mbv2.onnx")


def check_schema(d: dict, batches: list[int]) -> None:
    """The documented to_dict() schema, key by key, and that it survives JSON."""
    assert json.loads(json.dumps(d)) == d
    assert set(d) == TOP_KEYS
    assert d["schema_version"] == 1
    assert isinstance(d["artifact"], str) and isinstance(d["artifact_bytes"], int) and d["artifact_bytes"] > 0
    assert d["device"] == "cpu" and isinstance(d["threads"], int) and d["threads"] >= 1
    assert d["input_size"] == [3, 32, 32]
    assert isinstance(d["notes"], list)
    assert [r["batch"] for r in d["results"]] == batches
    for r in d["results"]:
        assert set(r) == RESULT_KEYS
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["mean_ms"] > 0 and r["std_ms"] >= 0
        assert r["throughput_ips"] == pytest.approx(r["batch"] * 1000 / r["mean_ms"])
        assert r["peak_rss_mb"] > 0 and r["peak_cuda_mb"] is None
    env = d["environment"]
    for key in ("cpu_model", "physical_cores", "logical_cores", "threads", "versions", "jetson", "warnings"):
        assert key in env
    assert env["threads"] == d["threads"]
    assert set(env["versions"]) >= {"torch", "onnxruntime", "tensorrt", "triton"}
    assert env["versions"]["torch"] is not None and "gpu" not in env  # GPU fields only for device cuda


def test_summarize_known_sequence():
    s = summarize(list(range(1, 101)))
    assert (s.p50_ms, s.p90_ms, s.p99_ms) == pytest.approx((50.5, 90.1, 99.01))
    assert s.mean_ms == pytest.approx(50.5)
    assert s.std_ms == pytest.approx(np.std(np.arange(1, 101), ddof=1))
    assert s.n == 100
    assert summarize([2.0]).std_ms == 0.0 and summarize([2.0]).p99_ms == 2.0
    with pytest.raises(ValueError):
        summarize([])


def test_config_defaults_and_validation():
    c = ProfileConfig()
    assert c.backend is Backend.AUTO and c.device == "cpu" and c.batch_sizes == (1, 8, 32)
    assert (c.warmup, c.iters) == (10, 50) and isinstance(c.threads, int) and c.threads >= 1
    assert ProfileConfig(backend="tensorrt").device == "cuda"  # GPU-only backends default to cuda
    assert ProfileConfig(backend="ort-cpu", batch_sizes=[2, 4]).batch_sizes == (2, 4)
    bad = [dict(backend="onnx"), dict(device="tpu"), dict(backend="tensorrt", device="cpu"),
           dict(backend="ort-cpu", device="cuda"), dict(batch_sizes=()), dict(batch_sizes=(0, 1)),
           dict(batch_sizes=(4, 4)), dict(warmup=-1), dict(iters=0), dict(threads=0),
           dict(input_size=(32, 32))]
    for kwargs in bad:
        with pytest.raises(ConfigError):
            ProfileConfig(**kwargs)


def test_torch_profile_schema():
    torch.manual_seed(0)
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2(num_classes=10)
    model.train()
    config = ProfileConfig("torch", batch_sizes=(1, 4), input_size=(3, 32, 32), threads=1, **FAST)
    result = profile(model, config)
    d = result.to_dict()
    check_schema(d, [1, 4])
    assert (d["backend"], d["artifact_kind"], d["threads"]) == ("torch", "module", 1)
    assert (d["warmup"], d["iters"]) == (1, 3)
    assert d["artifact_bytes"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert model.training  # eval() for the measurement, the caller's mode restored
    assert not torch.cuda.is_initialized()  # profiling on CPU never creates a CUDA context


def test_ort_cpu_profile_schema(mobilenet_onnx):
    result = profile(mobilenet_onnx, ProfileConfig("ort-cpu", batch_sizes=(1, 4), threads=1, **FAST))
    d = result.to_dict()
    check_schema(d, [1, 4])  # input size read from the ONNX model itself
    assert (d["backend"], d["artifact_kind"]) == ("ort-cpu", "onnx")
    assert d["artifact_bytes"] == mobilenet_onnx.stat().st_size


def test_measure_helpers(mobilenet_onnx):
    r = measure_module(conv_net(), (3, 32, 32), batch_sizes=(2,), threads=1, **FAST)
    assert r.backend == "torch" and [b.batch for b in r.results] == [2]
    r = measure_onnx(mobilenet_onnx.read_bytes(), batch_sizes=(1, 2), threads=1, **FAST)
    assert r.backend == "ort-cpu" and r.artifact == "<onnx bytes>" and len(r.results) == 2


def test_checkpoint_with_torch_backend(tmp_path):
    from kdexport.checkpoint import model_spec, save_checkpoint
    from kdexport.models import create_model

    model = create_model("lenet5", num_classes=10, stem="cifar")
    spec = model_spec("model", num_classes=10, stem="cifar", input_size=(3, 32, 32), dataset="digits",
                      mean=(0.3,) * 3, std=(0.3,) * 3, model="lenet5")
    path = tmp_path / "lenet5.pt"
    save_checkpoint(path, model.state_dict(), spec)
    r = profile(path, ProfileConfig("torch", batch_sizes=(1,), threads=1, **FAST))
    assert (r.artifact_kind, r.input_size) == ("checkpoint", (3, 32, 32))  # input size from the spec
    assert r.artifact_bytes == path.stat().st_size


def test_checkpoint_and_module_under_ort(tmp_path):
    """ORT on a checkpoint/module goes through kdexport.export; without that module it is refused cleanly."""
    import importlib.util

    model = conv_net()
    has_export = importlib.util.find_spec("kdexport.export") is not None
    auto = profile(model, ProfileConfig(batch_sizes=(1,), input_size=(3, 32, 32), threads=1, **FAST))
    assert any(n.startswith(f"auto chose {auto.backend}") for n in auto.notes)
    if has_export:
        r = profile(model, ProfileConfig("ort-cpu", batch_sizes=(1, 2), input_size=(3, 32, 32), **FAST))
        assert r.backend == "ort-cpu" and len(r.results) == 2
    else:
        assert auto.backend == "torch"
        assert "ort-cpu: the ONNX Runtime backends need kdexport.export" in auto.notes[0]
        with pytest.raises(BackendUnavailable, match="need kdexport.export"):
            profile(model, ProfileConfig("ort-cpu", input_size=(3, 32, 32), **FAST))


def test_static_batch_is_skipped_with_a_note(tmp_path):
    path = to_onnx(conv_net(), tmp_path / "static.onnx", dynamic=False)
    r = profile(path, ProfileConfig("ort-cpu", batch_sizes=(1, 4), threads=1, **FAST))
    assert [b.batch for b in r.results] == [1]
    assert any("batch 4 skipped" in n and "fixed batch of 1" in n for n in r.notes)
    with pytest.raises(ConfigError, match="no requested batch size"):
        profile(path, ProfileConfig("ort-cpu", batch_sizes=(4,), threads=1, **FAST))


def test_auto_on_onnx_says_what_it_chose(mobilenet_onnx):
    r = profile(mobilenet_onnx, ProfileConfig(batch_sizes=(1,), threads=1, **FAST))
    assert r.backend == "ort-cpu"
    assert any(n.startswith("auto chose ort-cpu") for n in r.notes)


@cpu_only
@pytest.mark.parametrize("backend,needle", [
    ("tensorrt", "pip install 'kdexport[tensorrt]'"),
    ("ort-cuda", "onnxruntime-gpu"),
    ("ort-trt", "TensorRT"),
    ("torch-sparse", "triton"),
])
def test_unavailable_backends_are_refused(backend, needle, mobilenet_onnx, tmp_path):
    reason = available_backends()[backend]
    assert reason is not None and needle in reason and "CUDA GPU" in reason and "\n" not in reason
    artifact = {"tensorrt": tmp_path / "m.engine", "torch-sparse": conv_net()}.get(backend, mobilenet_onnx)
    if backend == "tensorrt":
        artifact.write_bytes(b"not an engine")
    with pytest.raises(BackendUnavailable) as err:
        profile(artifact, ProfileConfig(backend, batch_sizes=(1,), input_size=(3, 32, 32), **FAST))
    assert str(err.value) == reason and isinstance(err.value, KdexportError)
    assert not torch.cuda.is_initialized()


@cpu_only
def test_cuda_device_refused_without_gpu():
    with pytest.raises(BackendUnavailable, match="use --device cpu"):
        profile(conv_net(), ProfileConfig("torch", device="cuda", input_size=(3, 32, 32), **FAST))


def test_wrong_artifact_kind_and_missing_file(mobilenet_onnx, tmp_path):
    assert available_backends()["torch"] is None and available_backends()["ort-cpu"] is None
    with pytest.raises(BackendUnavailable, match="'torch' cannot run an ONNX model .*--backend ort-cpu"):
        profile(mobilenet_onnx, ProfileConfig("torch", **FAST))
    with pytest.raises(ConfigError, match="artifact not found"):
        profile(tmp_path / "nope.onnx", ProfileConfig("ort-cpu", **FAST))
    (tmp_path / "model.bin").write_bytes(b"\x00" * 8)
    with pytest.raises(ConfigError, match="cannot tell what"):
        profile(tmp_path / "model.bin", ProfileConfig("ort-cpu", **FAST))
    with pytest.raises(ConfigError, match="pass input_size"):
        profile(conv_net(), ProfileConfig("torch", **FAST))


class ThreadProbe(nn.Module):
    """Records torch's thread count during forward; optionally fails, to test restoration on error."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.conv, self.fail, self.seen = nn.Conv2d(3, 4, 3), fail, set()

    def forward(self, x):
        self.seen.add(torch.get_num_threads())
        if self.fail:
            raise RuntimeError("boom")
        return self.conv(x)


def test_threads_fixed_recorded_and_restored():
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    probe = ThreadProbe()
    r = measure_module(probe, (3, 32, 32), batch_sizes=(1,), threads=target, **FAST)
    assert probe.seen == {target}
    assert r.threads == target and r.environment["threads"] == target
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="boom"):
        measure_module(ThreadProbe(fail=True), (3, 32, 32), batch_sizes=(1,), threads=target, **FAST)
    assert torch.get_num_threads() == before


def test_environment_cpu_touches_no_cuda():
    env = environment("cpu", threads=3)
    assert env["threads"] == 3 and env["device"] == "cpu" and env["logical_cores"] >= 1
    assert isinstance(env["cpu_model"], str) and env["cpu_model"]
    assert "gpu" not in env and not torch.cuda.is_initialized()
    json.dumps(env)


def test_half_channels_is_faster_under_ort_cpu(tmp_path):
    """Same run, same settings: a net with half the channels (about 1/4 of the MACs) has a lower median."""
    torch.manual_seed(0)
    full = to_onnx(conv_net(128), tmp_path / "full.onnx")
    slim = to_onnx(conv_net(64), tmp_path / "slim.onnx")
    kw = dict(batch_sizes=(32,), warmup=2, iters=5, threads=1)
    full_ms = measure_onnx(full, **kw).results[0].p50_ms
    slim_ms = measure_onnx(slim, **kw).results[0].p50_ms
    assert slim_ms < 0.9 * full_ms, (slim_ms, full_ms)


@needs_cuda
def test_torch_cuda_profile():
    r = measure_module(conv_net(), (3, 32, 32), batch_sizes=(1, 8), device="cuda", **FAST)
    d = r.to_dict()
    assert d["device"] == "cuda" and d["environment"]["gpu"]
    assert all(b["peak_cuda_mb"] is not None and b["peak_cuda_mb"] > 0 for b in d["results"])


@needs_cuda
def test_ort_cuda_profile(mobilenet_onnx):
    if available_backends()["ort-cuda"]:
        pytest.skip(available_backends()["ort-cuda"])
    r = measure_onnx(mobilenet_onnx, batch_sizes=(1, 8), device="cuda", **FAST)
    assert r.backend == "ort-cuda" and [b.batch for b in r.results] == [1, 8]


@needs_cuda
def test_tensorrt_engine_profile(mobilenet_onnx, tmp_path):
    if available_backends()["tensorrt"]:
        pytest.skip(available_backends()["tensorrt"])
    from kdexport.export.onnx_io import onnx_bytes
    from kdexport.export.tensorrt_engine import build_engine

    plan, _ = build_engine(onnx_bytes(conv_net().eval(), (3, 32, 32), batch=4, dynamic=False),
                           input_size=(3, 32, 32), batch=4, dynamic=False, half=False, int8=False, workspace_mb=256)
    engine = tmp_path / "net.engine"
    engine.write_bytes(plan)
    r = profile(engine, ProfileConfig("tensorrt", batch_sizes=(1, 4, 8), **FAST))
    assert [b.batch for b in r.results] == [4]  # a static batch-4 engine
    assert any("batch 8 skipped" in n for n in r.notes) and r.environment["versions"]["polygraphy"]


def test_channel_pruned_student_is_faster_under_ort_cpu(tmp_path):
    """Issue 6: a 50% channel-pruned distilled student beats its unpruned self at batch 32 (same run, wide margin)."""
    from kdexport.distill import DistilledStudent
    from kdexport.export import export_onnx
    from kdexport.profile import measure_onnx
    from kdexport.prune import PruneConfig, prune_channels_

    torch.manual_seed(0)
    dense = DistilledStudent.from_names("resnet18", "resnet18", num_classes=10, stem="cifar",
                                        input_size=(3, 32, 32)).eval()
    slim = copy.deepcopy(dense)
    prune_channels_(slim, PruneConfig(method="channel", amount=0.5), torch.randn(2, 3, 32, 32))
    paths = [export_onnx(m, tmp_path / f"{name}.onnx", input_size=(3, 32, 32))
             for name, m in (("dense", dense), ("slim", slim))]
    medians = {}
    for _ in range(2):  # interleave, so that a burst of load hits both
        for path in paths:
            result = measure_onnx(path, (32,), warmup=2, iters=5, threads=1)
            medians.setdefault(path.stem, []).append(result.results[0].p50_ms)
    assert min(medians["slim"]) < 0.8 * min(medians["dense"]), medians

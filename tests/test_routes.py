"""The CUDA route table (kernels/routes.py): its rows are well formed and cite real measurements, the
dispatch follows it on a (simulated) CUDA device, ``use_backend`` overrides it, dense attention goes to
SDPA, the accelerated modules follow it, and ``jepa-engine selfcheck`` lists it.

No CUDA device is needed: ``triton_runs_on`` is patched to say the kernels can run, the device class
cache is filled by hand (``cuda-sm90``, an H100), and where tensors must be on CUDA they are fake
tensors (``FakeTensorMode``: shapes and devices without data), which run SDPA's meta kernel without a
mask and the ops' fake kernels."""
from __future__ import annotations

import importlib
import itertools
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import jepa_engine
from jepa_engine.kernels import _launch, masked_attention_reference, routes, use_backend

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benches" / "results"
ma = importlib.import_module("jepa_engine.kernels.masked_attention")
CUDA = torch.device("cuda", 0)


@pytest.fixture
def h100(monkeypatch):
    """A process where the kernels can run on CUDA and device 0 is an H100 (cuda-sm90)."""
    monkeypatch.setattr(_launch, "triton_runs_on", lambda device: True)
    monkeypatch.setitem(routes._CUDA_CLASS, 0, "cuda-sm90")


# --------------------------------------------------------------------------------------------------
# The rows
# --------------------------------------------------------------------------------------------------
def _package_ops() -> set[str]:
    """Every op name of the package: the ``OP... = "name"`` constants of kernels/*.py."""
    ops = set()
    for path in Path(routes.__file__).parent.glob("*.py"):
        ops |= set(re.findall(r'^OP\w* = "(\w+)"', path.read_text(), re.M))
    return ops


def test_every_op_of_the_package_has_a_default_row():
    ops = _package_ops()
    assert {"masked_attention", "latent_loss", "ema_update_", "fused_linear", "elite_refit"} <= ops
    for op in ops:
        assert any(r.op == op and r.device == "cuda" and r.shape == "*" for r in routes.ROWS), (
            f"{op} has no default row (device 'cuda', shape '*') in kernels/routes.py")


@pytest.mark.parametrize("row", routes.ROWS, ids=lambda r: f"{r.op}-{r.device}-{r.shape}")
def test_rows_are_well_formed_and_cite_existing_results(row):
    assert row.op in routes.OPS and row.route in ("triton", "torch")
    assert row.device == "cuda" or row.device in routes.CUDA_CLASSES
    if row.evidence != "unmeasured":
        name, _, what = row.evidence.partition(": ")
        assert (RESULTS / name).is_file(), f"{row.evidence!r} cites {name}, not a file of benches/results/"
        assert re.search(r"\d+(\.\d+)? vs \d+(\.\d+)?", what) and re.search(r"\d\.\d+x", what), (
            f"{row.evidence!r} must give both times and the ratio")


def test_cited_bench_rows_exist_with_the_cited_medians():
    """Each ``N vs M ms`` of an evidence citing the bench JSON is a median (rounded) of a row of it."""
    import json

    rows = json.loads((RESULTS / routes.BENCH).read_text())["benchmarks"]
    medians = {round(r["extra_info"]["median_s"] * 1e3, 2) for r in rows}
    for row in routes.ROWS:
        if not row.evidence.startswith(routes.BENCH):
            continue
        for a, b in re.findall(r"(\d+\.\d+) vs (\d+\.\d+)", row.evidence):
            assert float(a) in medians and float(b) in medians, (row.evidence, a, b)


def test_every_class_resolves_to_a_backend():
    for (op, dev, shape), backend in routes._RESOLVED.items():
        assert backend in ("triton", "reference") and dev in routes.CUDA_CLASSES
    n = sum((len(list(itertools.product(*d))) if d else 0) + 1 for d in routes.SHAPE_DIMS.values())
    assert len(routes._RESOLVED) == n * len(routes.CUDA_CLASSES)


@pytest.mark.parametrize("bad, match", [
    (routes.Row("nope", "cuda", "*", "torch", "unmeasured"), "op must be one of"),
    (routes.Row("latent_loss", "cuda-sm75", "*", "torch", "unmeasured"), "device must be 'cuda' or one of"),
    (routes.Row("latent_loss", "cuda", "*", "reference", "unmeasured"), r"route must be one of \('triton', 'torch'\)"),
    (routes.Row("elite_refit", "cuda", ("E<8",), "torch", "unmeasured"), "shape value must be"),
    (routes.Row("latent_loss", "cuda", "*", "torch", ""), "evidence must cite"),
])
def test_a_bad_row_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        routes.resolve(routes.ROWS + (bad,))


def test_an_op_without_a_default_row_is_refused():
    rows = tuple(r for r in routes.ROWS if not (r.op == "latent_cost" and r.shape == "*"))
    with pytest.raises(ValueError, match="op 'latent_cost' must have a default row"):
        routes.resolve(rows)


def test_bad_lookups_name_the_argument(h100):
    with pytest.raises(ValueError, match=r"routes: op must be one of .*got 'nope'"):
        _launch.backend_for("nope", CUDA)
    with pytest.raises(ValueError, match=r"the shape class of elite_refit must be None or a tuple .*got \('E<8',\)"):
        _launch.backend_for("elite_refit", CUDA, ("E<8",))
    with pytest.raises(ValueError, match=r"the shape class of latent_loss must be None .*got \(1,\)"):
        _launch.backend_for("latent_loss", CUDA, (1,))


# --------------------------------------------------------------------------------------------------
# The dispatch follows the table
# --------------------------------------------------------------------------------------------------
def test_backend_for_follows_the_table_on_cuda(h100, monkeypatch):
    assert routes.row_for("latent_loss", CUDA).route == "torch"
    assert _launch.backend_for("latent_loss", CUDA) == "reference"
    assert routes.row_for("sample_actions", CUDA).route == "triton"
    assert _launch.backend_for("sample_actions", CUDA) == "triton"
    assert _launch.backend_for("elite_refit", CUDA, routes.refit_class(64)) == "triton"
    assert _launch.backend_for("elite_refit", CUDA, routes.refit_class(1)) == "reference"
    # it reads the table, not a rule of its own: flip one entry and the answer flips
    monkeypatch.setitem(routes._RESOLVED, ("latent_loss", "cuda-sm90", None), "triton")
    assert _launch.backend_for("latent_loss", CUDA) == "triton"
    # CPU tensors are not decided by the table
    assert _launch.backend_for("latent_loss", torch.device("cpu")) == "triton"


def test_other_cuda_classes_take_their_own_rows(h100, monkeypatch):
    monkeypatch.setitem(routes._CUDA_CLASS, 0, "cuda-sm80")
    assert routes.device_class(CUDA) == "cuda-sm80"
    assert _launch.backend_for("elite_refit", CUDA, routes.refit_class(64)) == "reference"   # unmeasured there
    assert routes.row_for("elite_refit", CUDA, routes.refit_class(64)).evidence == "unmeasured"
    assert _launch.backend_for("sample_actions", CUDA) == "triton"


def test_use_backend_overrides_the_table(h100):
    with use_backend("triton"):
        assert _launch.backend_for("latent_loss", CUDA) == "triton"
        assert _launch.backend_for("masked_attention", CUDA, routes.attention_class(64, 196, torch.float16)) == "triton"
    with use_backend("reference"):
        assert _launch.backend_for("sample_actions", CUDA) == "reference"


def test_the_table_is_read_under_torch_compile(h100):
    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        shape = routes.attention_class(x.shape[-1], x.shape[-2], x.dtype, frame_len=4)
        return x + 1 if _launch.backend_for("masked_attention", CUDA, shape) == "triton" else x - 1

    torch._dynamo.reset()
    assert f(torch.zeros(2, 2000, 64)).eq(1).all()     # frame-causal over 1024 keys: the kernel
    assert f(torch.zeros(2, 100, 64)).eq(-1).all()     # up to 1024 keys: SDPA


def test_device_classes():
    assert routes.device_class(torch.device("cpu")) == "cpu"
    if not torch.cuda.is_available():
        assert routes.cuda_class(0) == "cuda-other"


# --------------------------------------------------------------------------------------------------
# Attention: dense goes to SDPA; the PyTorch path computes the reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dev", routes.CUDA_CLASSES)
def test_dense_attention_routes_to_sdpa_on_every_cuda_class(dev):
    for d, n, dtype in [(16, 64, torch.float32), (64, 196, torch.bfloat16), (128, 4096, torch.float16),
                        (256, 1025, torch.float32)]:
        row = routes.row_for("masked_attention", dev, routes.attention_class(d, n, dtype))
        assert row.route == "torch", (dev, d, n, dtype, row)
    # a frame-causal mask of one frame hides nothing: dense too
    assert routes.attention_class(64, 2000, torch.float16, frame_len=2000)[0] == "none"


def _fake_cuda(*shape, dtype=torch.float16):
    return torch.empty(*shape, device="cuda", dtype=dtype)


def test_masked_attention_dispatch_on_cuda(h100, monkeypatch):
    """On (fake) CUDA tensors: dense and short masks take the PyTorch path (SDPA), varlen and long
    frame-causal the op (the kernel); a forced backend keeps the op's own behaviour."""
    took = []
    monkeypatch.setattr(ma, "_torch_attention", lambda q, *a: took.append("sdpa") or torch.empty_like(q))
    monkeypatch.setattr(ma, "_check_values", lambda *a: None)   # reads values: not on fake tensors
    class Op:   # the op, recording its calls
        native = ma._masked_attention_op.native

        def __call__(self, *args, op=ma._masked_attention_op):
            took.append("op")
            return op(*args)

    monkeypatch.setattr(ma, "_masked_attention_op", Op())
    with FakeTensorMode(), torch.no_grad():
        q = _fake_cuda(2, 3, 196, 64)
        kp = torch.empty(2, 196, dtype=torch.bool, device="cuda")
        idx = torch.empty(2, 50, dtype=torch.int64, device="cuda")
        long_q = _fake_cuda(1, 2, 2048, 64)
        packed = _fake_cuda(300, 2, 64)
        cu = torch.empty(3, dtype=torch.int32, device="cuda")
        for kwargs, want in [({}, "sdpa"), ({"key_padding": kp}, "sdpa"), ({"keep_index": idx}, "sdpa"),
                             ({"frame_size": 14}, "sdpa")]:
            took.clear()
            ma.masked_attention(q, q, q, **kwargs)
            assert took == [want], kwargs
        took.clear()
        ma.masked_attention(long_q, long_q, long_q, frame_size=256)
        ma.masked_attention(packed, packed, packed, cu_seqlens=cu, max_seqlen=150)
        assert took == ["op", "op"]
        took.clear()
        with use_backend("triton"):
            ma.masked_attention(q, q, q)
        with use_backend("reference"):
            monkeypatch.setattr(ma, "masked_attention_reference", lambda q, *a, **k: took.append("spec") or q)
            ma.masked_attention(q, q, q)
        assert took == ["op", "spec"]


@pytest.mark.parametrize("case", ["dense", "key_padding", "frame", "padding+frame", "index"])
def test_the_pytorch_path_computes_the_reference(case):
    """``_torch_attention`` (SDPA in the inputs' dtype) against the reference, outputs and gradients,
    with fully masked rows (sample 1 sees nothing) giving zeros, not NaN."""
    g = torch.Generator().manual_seed(0)
    B, H, N, D = 3, 2, 11, 16
    q, k, v = (torch.randn(B, H, N, D, generator=g, requires_grad=True) for _ in range(3))
    kp = torch.rand(B, N, generator=g) < 0.5
    kp[1] = False
    kw = {"dense": {}, "key_padding": {"key_padding": kp}, "frame": {"frame_size": 4},
          "padding+frame": {"key_padding": kp, "frame_size": 3},
          "index": {"keep_index": torch.tensor([[0, 3, 5, -1], [-1, -1, -1, -1], [10, 2, 1, 4]])}}[case]
    want = masked_attention_reference(q, k, v, **kw)
    got = ma._torch_attention(q, k, v, kw.get("key_padding"), kw.get("keep_index"), kw.get("frame_size", 0), D ** -0.5)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if case in ("key_padding", "index"):
        assert got[1].abs().max() == 0
    do = torch.randn(want.shape, generator=g)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), do), torch.autograd.grad(want, (q, k, v), do)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dense_pytorch_path_is_one_sdpa_call_in_the_inputs_dtype(monkeypatch):
    """Dense attention on the PyTorch path is SDPA itself: no mask, no upcast (flash on a GPU)."""
    calls = []

    class Functional:
        @staticmethod
        def scaled_dot_product_attention(q, k, v, attn_mask=None, scale=None):
            calls.append((q.dtype, attn_mask))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)

    monkeypatch.setattr(ma, "F", Functional)
    q = torch.randn(2, 2, 9, 8, dtype=torch.bfloat16)
    out = ma._torch_attention(q, q, q, None, None, 0, 0.3)
    assert calls == [(torch.bfloat16, None)] and out.dtype == torch.bfloat16


def test_the_pytorch_path_traces_whole():
    q = torch.randn(2, 2, 9, 8)
    kp = torch.ones(2, 9, dtype=torch.bool)
    f = torch.compile(ma._torch_attention, fullgraph=True, backend="eager")
    torch._dynamo.reset()
    torch.testing.assert_close(f(q, q, q, kp, None, 3, 0.3), ma._torch_attention(q, q, q, kp, None, 3, 0.3))


# --------------------------------------------------------------------------------------------------
# accelerate(): where the table says PyTorch, the module's own computation runs
# --------------------------------------------------------------------------------------------------
class DenseSdpa(nn.Module):
    """An SDPA-calling attention (the ``sdpa`` kind) without parameters."""

    def forward(self, q, k, v, is_causal=False):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def test_accelerated_sdpa_module_runs_its_own_sdpa_where_the_table_says_so(h100, monkeypatch):
    calls = []
    real = ma.masked_attention
    sdpa_mod = importlib.import_module("jepa_engine.integrations.sdpa")
    monkeypatch.setattr(sdpa_mod, "masked_attention", lambda *a, **k: calls.append("fused") or real(*a, **k))
    mod = DenseSdpa()
    assert jepa_engine.accelerate(mod).patched[0].kind == "sdpa"
    with FakeTensorMode(), torch.no_grad():
        q = _fake_cuda(2, 2, 64, 32)
        mod(q, q, q)                       # dense: the route table gives it to SDPA
        long_q = _fake_cuda(1, 2, 1100, 32)
        mod(long_q, long_q, long_q, is_causal=True)   # causal over 1024 keys: the kernel's frame-causal mode
    s = jepa_engine.stats(mod).modules[""]
    assert calls == ["fused"] and s.fused == 1
    assert s.fallbacks == {"route table: PyTorch (SDPA) is the faster path on cuda-sm90": 1}


class IJepaForm(nn.Module):
    """The I-JEPA ``Attention`` form (``forward(x, mask) -> (x, attn)``), written with ``unbind``."""

    def __init__(self, dim=64, num_heads=2):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop = nn.Dropout(0.0), nn.Dropout(0.0)

    def forward(self, x, mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj_drop(self.proj(x))
        return x, attn


def test_accelerated_ijepa_module_runs_its_original_forward_on_cuda(h100):
    model = nn.Sequential(IJepaForm()).requires_grad_(False)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        model = model.to_empty(device="cuda")
        report = jepa_engine.accelerate(model)
        assert [e.kind for e in report.patched] == ["ijepa"]
        out, attn = model[0](_fake_cuda(2, 13, 64, dtype=torch.float32))
    assert attn is not None     # the original forward ran: it returns the weights (the fused one None)
    s = jepa_engine.stats(model)
    assert s.fused == 0 and s.reasons() == {"route table: PyTorch (SDPA) is the faster path on cuda-sm90": 1}
    cls = f"{__name__}.IJepaForm"
    assert report.routes == {cls: "on cuda-sm90, head dim 32, torch.float32: SDPA: none, key_padding, index, "
                                  "frame_causal N<=1024; kernel: frame_causal N>1024, varlen"}
    assert f"route    {cls}: on cuda-sm90" in str(report)


def test_accelerate_on_cpu_reports_no_route():
    from tests.test_accelerate import SdpaAttention, Tree

    model = Tree(SdpaAttention)
    report = jepa_engine.accelerate(model)
    assert report.routes == {} and "route " not in str(report)


# --------------------------------------------------------------------------------------------------
# selfcheck lists the table
# --------------------------------------------------------------------------------------------------
def test_selfcheck_lists_every_row(capsys, monkeypatch):
    from jepa_engine import selfcheck

    monkeypatch.setattr(_launch, "kernel_test_device", lambda: _launch.KernelTestDevice(None, "test"))
    monkeypatch.setattr(_launch, "triton_available", lambda: False)
    selfcheck.run()
    out = capsys.readouterr().out
    assert "CUDA route table (kernels/routes.py" in out
    lines = out.splitlines()
    for row in routes.ROWS:
        shape = row.shape if row.shape == "*" else " ".join(map(str, row.shape))
        mark = "UNMEASURED" if row.evidence == "unmeasured" else row.evidence
        want = re.compile(rf"^\s+{row.op}\s+{re.escape(row.device)}\s+{re.escape(shape)}\s+{row.route}\s+"
                          rf"{re.escape(mark)}$")
        assert any(want.match(line) for line in lines), f"selfcheck does not list {row}"

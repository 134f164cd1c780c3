"""accelerate / restore: patched models against the unpatched ones (outputs and every gradient), for a
real timm ViT, an I-JEPA-style attention tree and an SDPA-calling module; masks, fallbacks, restore,
idempotence, the report, the timm EMA helper, torch.compile(fullgraph=True) and torch.export on CPU.

A test parametrized by ``backend`` runs on the ``backend_device`` fixture (tests/conftest.py): the
Triton backend on the kernel device (CUDA compiled where present, else CPU under the interpreter),
the reference on CPU; the unpatched model runs on the same device."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jepa_engine
from jepa_engine.integrations.accelerate import patch_model_ema
from jepa_engine.integrations.masks import to_attention_plan, to_key_padding
from jepa_engine.kernels import use_backend
from tests.helpers import assert_close, needs_triton
from tests.timm_compat import import_timm

# Gradients sum over every query/key of a row: twice the output's tolerance (as the kernel tests).
GRAD_SCALE = 2.0
BACKENDS = ["reference", pytest.param("triton", marks=needs_triton)]


# --------------------------------------------------------------------------------------------------
# timm, importable on a CPU-only torch
# --------------------------------------------------------------------------------------------------
def _import_timm():
    """timm (see tests/timm_compat.py), or a visible skip when it is not installed (``make install``
    installs it)."""
    timm = import_timm()
    if timm is None:
        pytest.skip("timm/torchvision are not installed (make install adds them)")
    return timm


def tiny_timm_vit(seed=0):
    timm = _import_timm()
    torch.manual_seed(seed)
    # 32 px / 8 px patches + class token = 17 tokens; 64 wide, 2 heads of 32; qk-norm on.
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                             depth=2, num_heads=2, num_classes=5, qk_norm=True).eval()


# --------------------------------------------------------------------------------------------------
# Module trees written here: the I-JEPA ViT attention, an SDPA-calling attention, unrecognised ones
# --------------------------------------------------------------------------------------------------
class IJepaAttention(nn.Module):
    """The plain ViT attention of the I-JEPA code: returns ``(x, attn)``; ``mask`` is key padding."""

    def __init__(self, dim, num_heads=2, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if mask is not None:
            attn = attn.masked_fill(~mask[:, None, None, :], float("-inf"))
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj_drop(self.proj(x))
        return x, attn


class SdpaAttention(nn.Module):
    """V-JEPA 2 style: a forward of its own (here a rotation of q/k) that calls SDPA with a mask."""

    def __init__(self, dim, num_heads=2):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = q.roll(1, dims=-1), k.roll(1, dims=-1)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, attn, dim):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), attn
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, mask=None):
        y = self.attn(self.norm1(x), mask)
        if isinstance(y, tuple):
            y = y[0]
        x = x + y
        return x + self.mlp(x)


class Tree(nn.Module):
    def __init__(self, make_attn, dim=64, depth=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(Block(make_attn(dim), dim) for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def forward(self, x, mask=None):
        for blk in self.blocks:
            x = blk(x, mask)
        return self.head(x)


class ManualAttention(nn.Module):
    """Attention-like, but neither recognised form: left alone and listed."""

    def __init__(self, dim):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1) @ self.v(x)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def _run(model, inputs, *args):
    """Output and the gradients of every parameter and of the input (sum of the output times a fixed
    random cotangent, drawn on CPU)."""
    x = inputs.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x, *args)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    (out * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.clone(), grads


def _compare(patched, plain, inputs, *args, backend="reference", device):
    """The patched model under ``backend`` against the unpatched one, both moved to ``device`` (in
    place) with ``inputs`` and the tensor ``args``: output, input gradient, every parameter gradient.

    Compiled on CUDA, the attention backward's fp32 dots run as TF32 (``BWD_ALLOWS_TF32``): the
    gradients of the Triton backend are compared at the TF32 gradient tolerance there (tests/helpers.py),
    at fp32's elsewhere; the forward is IEEE fp32 everywhere."""
    patched.to(device)
    plain.to(device)
    inputs = inputs.to(device)
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    ctx = use_backend(backend) if backend else contextlib.nullcontext()
    with ctx:
        out, gx, grads = _run(patched, inputs, *args)
    ref_out, ref_gx, ref_grads = _run(plain, inputs, *args)
    tf32 = backend == "triton"
    assert_close(out, ref_out, what="output")
    assert_close(gx, ref_gx, what="input grad", scale=GRAD_SCALE, tf32=tf32, grad=True)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        assert_close(grads[n], ref_grads[n], what=f"grad {n}", scale=GRAD_SCALE, tf32=tf32, grad=True)


def _key_padding(B, N, seed=0):
    kp = torch.rand(B, N, generator=torch.Generator().manual_seed(seed)) < 0.7
    kp[:, 0] = True  # every sample sees a key (SDPA gives NaN for fully masked rows; we give 0)
    return kp


# --------------------------------------------------------------------------------------------------
# timm ViT
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_timm_vit_matches_unpatched(backend, backend_device):
    plain = tiny_timm_vit()
    model = copy.deepcopy(plain)
    report = jepa_engine.accelerate(model)
    assert [e.name for e in report.patched] == ["blocks.0.attn", "blocks.1.attn"]
    assert {e.kind for e in report.patched} == {"timm"}
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _compare(model, plain, x, backend=backend, device=backend_device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_timm_attention_key_padding_masks(backend, backend_device):
    """timm's attn_mask in SDPA form (bool [B, 1, 1, N], additive) and our [B, N] key padding."""
    plain = tiny_timm_vit().blocks[0].attn
    attn = copy.deepcopy(plain)
    jepa_engine.accelerate(attn)
    B, N = 3, 17
    x = torch.randn(B, N, 64, generator=torch.Generator().manual_seed(2))
    kp = _key_padding(B, N)
    additive = torch.zeros(B, 1, 1, N).masked_fill(~kp[:, None, None, :], float("-inf"))
    _compare(attn, plain, x, kp[:, None, None, :], backend=backend, device=backend_device)
    _compare(attn, plain, x, additive, backend=backend, device=backend_device)
    x, kp = x.to(backend_device), kp.to(backend_device)
    with use_backend(backend):
        out = attn(x, kp)  # [B, N] key padding: our user format
    assert_close(out, plain(x, kp[:, None, None, :]), what="[B, N] key padding")


def test_timm_fallbacks_keep_results():
    """A mask that is not key padding, and is_causal, run timm's own forward: same results."""
    plain = tiny_timm_vit().blocks[0].attn
    attn = copy.deepcopy(plain)
    jepa_engine.accelerate(attn)
    B, N = 2, 17
    x = torch.randn(B, N, 64)
    full = torch.rand(B, 1, N, N, generator=torch.Generator().manual_seed(3)) < 0.7
    full[..., 0] = True
    assert_close(attn(x, full), plain(x, full), what="full mask")
    assert_close(attn(x, is_causal=True), plain(x, is_causal=True), what="is_causal")
    with pytest.raises(ValueError, match="^to_key_padding: mask is not expressible as key padding: "):
        to_key_padding(full, B, N, N)
    with pytest.raises(ValueError, match="^to_attention_plan: mask is neither key padding nor frame-causal: "):
        to_attention_plan(full, B, N, N)
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    kp, frame_len = to_attention_plan(causal, B, N, N)
    assert frame_len == 1 and (kp is None or bool(kp.all()))
    with pytest.raises(ValueError, match="^to_key_padding: mask is not expressible as key padding: it is frame-causal "
                                         "with 1 tokens per frame$"):
        to_key_padding(causal, B, N, N)


# --------------------------------------------------------------------------------------------------
# I-JEPA-style and SDPA-calling trees
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
def test_ijepa_tree_matches_unpatched(backend, masked, backend_device):
    plain = Tree(IJepaAttention)
    model = copy.deepcopy(plain)
    report = jepa_engine.accelerate(model)
    assert [(e.name, e.kind) for e in report.patched] == [("blocks.0.attn", "ijepa"), ("blocks.1.attn", "ijepa")]
    x = torch.randn(2, 19, 64, generator=torch.Generator().manual_seed(4))
    args = (_key_padding(2, 19),) if masked else ()
    _compare(model, plain, x, *args, backend=backend, device=backend_device)


def test_ijepa_attention_weights():
    """The fused path returns None for the weights; need_weights=True runs the original forward."""
    plain = IJepaAttention(64)
    attn = copy.deepcopy(plain)
    jepa_engine.accelerate(attn)
    x = torch.randn(2, 9, 64)
    out, weights = attn(x)
    assert weights is None
    out2, weights2 = attn(x, need_weights=True)
    ref, ref_weights = plain(x)
    assert_close(out, ref)
    assert_close(out2, ref)
    assert_close(weights2, ref_weights)


def test_index_list_masks():
    """I-JEPA ``masks`` (lists of kept indices) become the key padding of their union."""
    idx = [torch.tensor([[0, 2], [1, 3]]), torch.tensor([[2, 5], [4, 4]])]
    kp = to_key_padding(idx, 2, 6, 6)
    expected = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 0, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(kp, expected)
    plain = IJepaAttention(64)
    attn = copy.deepcopy(plain)
    jepa_engine.accelerate(attn)
    x = torch.randn(2, 6, 64)
    assert_close(attn(x, idx)[0], plain(x, expected)[0], what="index-list mask")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", ["none", "bool", "bool_full", "additive", "not_key_padding"])
def test_sdpa_module_matches_unpatched(backend, mask, backend_device):
    plain = Tree(SdpaAttention)
    model = copy.deepcopy(plain)
    report = jepa_engine.accelerate(model)
    assert [(e.name, e.kind) for e in report.patched] == [("blocks.0.attn", "sdpa"), ("blocks.1.attn", "sdpa")]
    B, N = 2, 13
    kp = _key_padding(B, N, seed=5)
    masks = {
        "none": None,
        "bool": kp[:, None, None, :],
        "bool_full": kp[:, None, None, :].expand(B, 2, N, N),  # key padding written out in full
        "additive": torch.zeros(B, 1, 1, N).masked_fill(~kp[:, None, None, :], float("-inf")),
        "not_key_padding": torch.ones(N, N, dtype=torch.bool).tril(),  # falls back to SDPA
    }
    x = torch.randn(B, N, 64, generator=torch.Generator().manual_seed(6))
    args = () if masks[mask] is None else (masks[mask],)
    _compare(model, plain, x, *args, backend=backend, device=backend_device)


# --------------------------------------------------------------------------------------------------
# Report, idempotence, restore
# --------------------------------------------------------------------------------------------------
class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.ijepa = IJepaAttention(64)
        self.sdpa = SdpaAttention(64)
        self.manual = ManualAttention(64)
        self.mha = nn.MultiheadAttention(64, 2, batch_first=True)
        self.odd = IJepaAttention(528, num_heads=2)  # head dim 264: above the kernel's 256


def test_report_lists_skipped_and_accelerate_twice_is_noop():
    model = Mixed()
    report = jepa_engine.accelerate(model)
    assert {e.name: e.kind for e in report.patched} == {"ijepa": "ijepa", "sdpa": "sdpa"}
    skipped = {e.name: e.reason for e in report.skipped}
    assert set(skipped) == {"manual", "mha", "odd"}
    assert "head dim 264" in skipped["odd"]
    assert "MultiheadAttention" in skipped["mha"]
    assert "unrecognised" in skipped["manual"]
    assert "skipped" in str(report)
    forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    again = jepa_engine.accelerate(model)
    assert again.patched == [] and {e.name for e in again.already} == {"ijepa", "sdpa"}
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == forwards


def test_restore_gives_back_the_original_modules():
    model = Mixed()
    modules = dict(model.named_modules())
    params = {n: p for n, p in model.named_parameters()}
    dicts = {n: set(m.__dict__) for n, m in modules.items()}
    keys = list(model.state_dict())
    jepa_engine.accelerate(model)
    # Same modules, same parameter tensors, same state_dict keys while patched.
    assert dict(model.named_modules()) == modules
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == keys
    jepa_engine.restore(model)
    assert dict(model.named_modules()) == modules
    assert {n: set(m.__dict__) for n, m in model.named_modules()} == dicts
    assert all("forward" not in m.__dict__ for m in model.modules())
    jepa_engine.restore(model)  # idempotent


def test_fused_attn_flag_restored():
    timm = _import_timm()
    attn = timm.layers.Attention(64, num_heads=2)
    attn.fused_attn = False
    # Recognised as timm's Attention (its forward is replaced whole): the flag is not touched.
    assert jepa_engine.accelerate(attn).patched[0].kind == "timm"
    assert attn.fused_attn is False
    jepa_engine.restore(attn)
    assert "forward" not in attn.__dict__


# --------------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------------
def test_timm_model_ema_v3_patched_matches_and_restores():
    timm = _import_timm()
    from timm.utils import ModelEmaV3

    online = Tree(IJepaAttention)
    online.register_buffer("running", torch.randn(4))
    ema_a = ModelEmaV3(online, decay=0.9)
    ema_b = ModelEmaV3(online, decay=0.9)
    report = jepa_engine.accelerate(online, ema=ema_b)
    assert "one-launch" in report.ema
    for step in range(3):
        with torch.no_grad():
            for p in online.parameters():
                p.add_(torch.randn_like(p))
            online.running.mul_(2.0)
        ema_a.update(online, step=step + 5)
        ema_b.update(online, step=step + 5)
    for (n, a), b in zip(ema_a.module.state_dict().items(), ema_b.module.state_dict().values()):
        assert_close(b, a, what=n)
    jepa_engine.restore(online)
    assert "update" not in vars(ema_b)
    assert timm is not None


def test_ema_with_any_same_structure_pair():
    """jepa_engine.EMA on a hand-made pair (the loop it replaces: p_t = m p_t + (1 - m) p_o)."""
    online, target = Tree(IJepaAttention, seed=0), Tree(IJepaAttention, seed=1)
    target.requires_grad_(False)
    expected = [0.99 * t + 0.01 * o for t, o in zip(target.parameters(), online.parameters())]
    jepa_engine.EMA(online, target, momentum=0.99).step()
    for e, t in zip(expected, target.parameters()):
        assert_close(t, e)


# --------------------------------------------------------------------------------------------------
# torch.compile and torch.export on CPU
# --------------------------------------------------------------------------------------------------
def test_compile_fullgraph_patched_timm_vit():
    plain = tiny_timm_vit()
    model = copy.deepcopy(plain)
    jepa_engine.accelerate(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    with use_backend("reference"):
        out = compiled(x)
        out.sum().backward()
    assert_close(out, plain(x), what="compiled output")
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_compile_fullgraph_sdpa_and_ijepa_with_masks():
    kp = _key_padding(2, 13)
    additive = torch.zeros(2, 1, 1, 13).masked_fill(~kp[:, None, None, :], float("-inf"))
    # An additive mask is not inspected under compile (compile_safe): SDPA runs it, still one graph.
    for make, mask in ((SdpaAttention, kp[:, None, None, :]), (SdpaAttention, additive), (IJepaAttention, kp)):
        plain = Tree(make)
        model = copy.deepcopy(plain)
        jepa_engine.accelerate(model)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        x = torch.randn(2, 13, 64)
        with use_backend("reference"):
            out = compiled(x, mask)
        assert_close(out, plain(x, mask), what=f"compiled {make.__name__}")


def test_export_patched_models():
    plain = tiny_timm_vit()
    model = copy.deepcopy(plain)
    jepa_engine.accelerate(model)
    x = torch.randn(2, 3, 32, 32)
    with use_backend("reference"):
        ep = torch.export.export(model, (x,))
        out = ep.module()(x)
    assert "jepa_engine.masked_attention" in str(ep.graph_module.code)
    assert_close(out, plain(x), what="exported output")
    tree = Tree(SdpaAttention)
    jepa_engine.accelerate(tree)
    kp = _key_padding(2, 13)[:, None, None, :]
    xt = torch.randn(2, 13, 64)
    with use_backend("reference"):
        ep = torch.export.export(tree, (xt, kp))
        assert_close(ep.module()(xt, kp), tree(xt, kp), what="exported sdpa tree")


def test_sdpa_flag_set_and_restored_and_deepcopy():
    """A module choosing SDPA by a flag (V-JEPA's use_sdpa) takes the SDPA path while patched; a deep
    copy of a patched model (e.g. an EMA target made after accelerate) is patched and restorable."""
    attn = SdpaAttention(64)
    attn.use_sdpa = False
    jepa_engine.accelerate(attn)
    assert attn.use_sdpa is True
    twin = copy.deepcopy(attn)
    x = torch.randn(2, 5, 64)
    assert twin.forward.__self__ is twin
    assert_close(twin(x), attn(x))
    jepa_engine.restore(attn)
    jepa_engine.restore(twin)
    assert attn.use_sdpa is False and twin.use_sdpa is False
    assert "forward" not in attn.__dict__ and "forward" not in twin.__dict__


class FlaggedAttention(nn.Module):
    """V-JEPA 2 ``RoPEAttention``'s two branches: SDPA (which drops with ``proj_drop_prob`` and scales by
    1/sqrt(head dim)) when ``use_sdpa``, else an explicit one scaled by ``qk_scale`` with ``attn_drop``."""

    def __init__(self, dim, num_heads=2, qk_scale=None, attn_drop=0.0, proj_drop_prob=0.0, use_sdpa=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop_prob, self.use_sdpa = nn.Dropout(attn_drop), proj_drop_prob, use_sdpa

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        if self.use_sdpa:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.proj_drop_prob)
        else:
            x = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("kw, skipped", [
    (dict(), ""),
    (dict(qk_scale=0.05), "use_sdpa=False: its explicit attention scales by 0.05, not 1/sqrt(head dim 32)"),
    (dict(attn_drop=0.5), "use_sdpa=False: its explicit attention drops weights with p=0.5, which its SDPA "
                          "branch may not"),
    (dict(proj_drop_prob=0.1), "use_sdpa=False: its SDPA branch would drop attention weights with proj_drop_prob=0.1"),
    (dict(qk_scale=0.05, use_sdpa=True), ""),          # its own SDPA branch ignores qk_scale: so does the fused op
])
def test_sdpa_flag_is_switched_only_where_both_branches_compute_the_same(kw, skipped):
    """Switching V-JEPA 2's use_sdpa on used to drop a custom qk_scale and the explicit branch's attention
    dropout without a word: such a module now keeps its own code and is listed as skipped, with why."""
    torch.manual_seed(0)
    plain = FlaggedAttention(64, **kw).eval()
    attn = copy.deepcopy(plain)
    report = jepa_engine.accelerate(attn)
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        assert_close(attn(x), plain(x), what=str(kw))
    if skipped:
        assert not report.patched and "forward" not in attn.__dict__ and attn.use_sdpa is False
        assert [r.reason for r in report.skipped] == [skipped + "; its own code runs"], report.skipped
    else:
        assert [p.kind for p in report.patched] == ["sdpa"] and attn.use_sdpa is True
        assert jepa_engine.stats(attn).fused == 1
        jepa_engine.restore(attn)
        assert attn.use_sdpa is plain.use_sdpa


def test_ema_pairs_a_compiled_online_model_with_a_plain_target():
    online = Tree(IJepaAttention, seed=0)
    target = Tree(IJepaAttention, seed=1).requires_grad_(False)
    expected = [0.9 * t + 0.1 * o for t, o in zip(target.parameters(), online.parameters())]
    jepa_engine.EMA(torch.compile(online), target, momentum=0.9).step()
    for e, t in zip(expected, target.parameters()):
        assert_close(t, e)


def test_compile_safe_false_inspects_full_masks_under_compile():
    """compile_safe=False: a full mask that is key padding is still fused while compiling (a graph break)."""
    plain = Tree(SdpaAttention)
    model = copy.deepcopy(plain)
    jepa_engine.accelerate(model, compile_safe=False)
    kp = _key_padding(2, 13)
    full = kp[:, None, None, :].expand(2, 1, 13, 13)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(2, 13, 64)
    with use_backend("reference"):
        assert_close(compiled(x, full), plain(x, full), what="compile_safe=False")


def test_accelerate_precision_is_checked_kept_and_applied(monkeypatch):
    """``accelerate(precision=)``: a bad value names itself; the patched forward runs under that setting
    (the TF32 flag it sees is recorded) and leaves the global flag as it was; bf16 runs under autocast;
    None follows torch's own setting."""
    import torch.nn.functional as F

    from jepa_engine.integrations import accelerate as acc_mod

    with pytest.raises(ValueError, match="accelerate: precision must be one of"):
        acc_mod.accelerate(torch.nn.Linear(2, 2), precision="fp8")
    seen = []

    class Attn(torch.nn.Module):
        def forward(self, x):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.is_autocast_enabled("cpu")))
            q = x.unflatten(-1, (2, 8)).transpose(1, 2)
            return F.scaled_dot_product_attention(q, q, q).transpose(1, 2).flatten(2)

    x = torch.randn(2, 5, 16)
    before = torch.backends.cuda.matmul.allow_tf32
    for precision, want in (("tf32", (True, False)), ("fp32", (False, False)), ("bf16", (before, True)),
                            (None, (before, False))):
        m = Attn()
        report = acc_mod.accelerate(m, precision=precision)
        assert len(report.patched) == 1, report
        seen.clear()
        m(x)
        assert seen == [want], (precision, seen)
        assert torch.backends.cuda.matmul.allow_tf32 == before

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from coatflux import COATConfig, apply_coat, saved_activation_bytes
from coatflux.core.activation import ActivationCompressor
from coatflux.core.config import ActivationConfig
from coatflux.core.formats import sqnr_db


class Block(nn.Module):
    """A DiT-like block: LayerNorm + AdaLN modulation, attention, GELU-tanh MLP, gated residuals."""

    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.heads = heads
        self.mod = nn.Linear(dim, 3 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x, emb):
        shift, scale, gate = self.mod(nn.functional.silu(emb)).unsqueeze(1).chunk(3, dim=-1)
        h = self.norm(x) * (1 + scale) + shift
        b, n, d = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + gate * self.out(a)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x)), approximate="tanh"))


def _inputs(dtype=torch.float32):
    torch.manual_seed(1)
    return torch.randn(2, 128, 64, dtype=dtype), torch.randn(2, 64, dtype=dtype)


def _forward_backward(model, x, emb, g):
    x = x.clone().requires_grad_(True)
    y = model(x, emb)
    y.backward(g)
    return y.detach(), x.grad


@pytest.fixture
def pair():
    torch.manual_seed(0)
    ref = Block()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        coat = apply_coat(copy.deepcopy(ref), COATConfig(activation=ActivationConfig(min_saved_numel=256)))
    return ref, coat


def test_outputs_and_gradients_close_to_reference(pair):
    ref, coat = pair
    x, emb = _inputs()
    g = torch.randn(2, 128, 64)
    y0, gx0 = _forward_backward(ref, x, emb, g)
    y1, gx1 = _forward_backward(coat, x, emb, g)
    assert sqnr_db(y0, y1) > 20 and sqnr_db(gx0, gx1) > 15
    assert sqnr_db(ref.fc1.weight.grad, coat.fc1.weight.grad) > 15


def test_saved_bytes_shrink(pair):
    ref, coat = pair
    x, emb = _inputs(torch.bfloat16)
    ref, coat = ref.to(torch.bfloat16), coat.to(torch.bfloat16)
    xr = x.clone().requires_grad_(True)
    base = saved_activation_bytes(ref, lambda: ref(xr, emb))
    ours = saved_activation_bytes(coat, lambda: coat(xr, emb))
    # the block's input is the caller's leaf tensor (kept as is) and attention stays bf16
    assert 0 < ours < 0.7 * base


def test_attention_tensors_stay_in_their_dtype():
    seen = []
    comp = ActivationCompressor(ActivationConfig(min_saved_numel=1))
    comp_pack = comp._pack
    comp._pack = lambda t: seen.append(comp_pack(t)) or seen[-1]
    q = torch.randn(1, 2, 32, 16, requires_grad=True) * 1.0
    with comp():
        out = nn.functional.scaled_dot_product_attention(q, q, q)
        y = torch.nn.functional.gelu(out, approximate="tanh")
    y.sum().backward()
    # attention's saved tensors kept their dtype; GELU's input (attention's output) was packed
    assert any(torch.is_tensor(s) and s.dtype == torch.float32 and s.shape == q.shape for s in seen)
    assert sum(not torch.is_tensor(s) for s in seen) == 1


def test_composes_with_non_reentrant_checkpoint(pair):
    ref, coat = pair

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, emb):
            return checkpoint(self.inner, x, emb, use_reentrant=False)

    wrapped = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ck = apply_coat(Wrapped(wrapped), COATConfig(activation=ActivationConfig(min_saved_numel=256)))
    x, emb = _inputs()
    g = torch.randn(2, 128, 64)
    y0, gx0 = _forward_backward(coat, x, emb, g)
    y1, gx1 = _forward_backward(ck, x, emb, g)
    _, gx_ref = _forward_backward(ref, x, emb, g)
    assert torch.equal(y0, y1)
    # inside the checkpoint activations are recomputed, not stored: gradients at least as good
    assert sqnr_db(gx_ref, gx1) >= sqnr_db(gx_ref, gx0) - 0.5
    assert sqnr_db(gx_ref, gx1) > 15


def test_hooks_are_removed_even_if_forward_raises(pair):
    _, coat = pair
    with pytest.raises(RuntimeError):
        coat(torch.randn(2, 8, 63), torch.randn(2, 64))
    x = torch.randn(4, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        (x * x).sum()
    assert saved and all(t.dtype == torch.float32 for t in saved)


# --- concatenations stored as their parts (FLUX's single blocks) -------------------------------


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)


class ParallelBlock(nn.Module):
    """FLUX's single-block layout: attention and a GELU MLP side by side, concatenated into one linear."""

    def __init__(self, dim: int = 64, heads: int = 4, touch_attention: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = SelfAttention(dim, heads)
        self.fc = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(5 * dim, dim)
        self.touch_attention = touch_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        a = self.attn(h)
        if self.touch_attention:
            a.mul_(1.0)  # an in-place change before the concatenation: its part is no longer recognised
        return x + self.proj(torch.cat([a, self.act(self.fc(h))], dim=-1))


def _concat_run(model: nn.Module, x: torch.Tensor, recipe: bool, monkeypatch) -> tuple[int, list, list]:
    """(saved bytes, [output, x.grad, proj weight grad], concatenations stored as parts)."""
    compressor = model.coat_context.compressor
    found, original = [], compressor._concatenation
    monkeypatch.setattr(compressor, "_concatenation",
                        lambda t: found.append(original(t)) or found[-1] if recipe else None)
    x = x.clone().requires_grad_(True)
    out = []
    nbytes = saved_activation_bytes(model, lambda: out.append(model(x)) or out[0])
    out[0].float().square().sum().backward()
    results = [out[0].detach(), x.grad, model.proj.weight.grad]
    model.zero_grad(set_to_none=True)
    return nbytes, results, [c for c in found if c is not None]


def _coat(model: nn.Module, min_saved_numel: int = 0) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return apply_coat(model, COATConfig(activation=ActivationConfig(min_saved_numel=min_saved_numel)))


def test_concatenation_of_attention_and_gelu_outputs_is_stored_as_its_parts(monkeypatch):
    torch.manual_seed(0)
    model = _coat(ParallelBlock().to(torch.bfloat16))
    x = torch.randn(2, 64, 64, dtype=torch.bfloat16)
    with_parts, ours, concats = _concat_run(model, x, True, monkeypatch)
    whole, reference, none = _concat_run(model, x, False, monkeypatch)
    assert len(concats) == 1 and not none
    # the concatenation's own FP8 copy (1 byte x 5 widths) is gone; the attention part is stored
    # per group (1 + 1/16 bytes x 1 width) and the GELU part recomputed from the GELU's FP8 input
    tokens = 2 * 64
    assert whole - with_parts >= tokens * 64 * (5 - 1.0625) * 0.99
    for r, o in zip(reference, ours, strict=True):
        assert sqnr_db(r.float(), o.float()) > 25


def test_a_part_too_small_to_compress_is_kept_as_it_is(monkeypatch):
    torch.manual_seed(0)
    # the attention part (8,192 values) is below min_saved_numel, the concatenation (40,960) is not
    model = _coat(ParallelBlock().to(torch.bfloat16), min_saved_numel=10_000)
    x = torch.randn(2, 64, 64, dtype=torch.bfloat16)
    _, ours, concats = _concat_run(model, x, True, monkeypatch)
    _, reference, _ = _concat_run(model, x, False, monkeypatch)
    assert len(concats) == 1 and any(torch.is_tensor(part) for part in concats[0].parts)
    for r, o in zip(reference, ours, strict=True):
        assert sqnr_db(r.float(), o.float()) > 25


def test_a_part_changed_in_place_before_the_concatenation_is_not_taken(monkeypatch):
    torch.manual_seed(0)
    model = _coat(ParallelBlock(touch_attention=True).to(torch.bfloat16))
    x = torch.randn(2, 64, 64, dtype=torch.bfloat16)
    _, ours, concats = _concat_run(model, x, True, monkeypatch)
    _, reference, _ = _concat_run(model, x, False, monkeypatch)
    assert concats == []
    for r, o in zip(reference, ours, strict=True):
        assert torch.equal(r, o)


def test_flux_single_blocks_store_their_concatenation_as_parts(monkeypatch):
    from coatflux.bench.model import PRESETS, build_transformer, loss_of, make_batch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _coat(build_transformer(PRESETS["tiny"], "cpu").requires_grad_(False))
    compressor, found = model.coat_context.compressor, []
    original = compressor._concatenation
    monkeypatch.setattr(compressor, "_concatenation", lambda t: found.append(original(t)) or found[-1])
    batch = make_batch(PRESETS["tiny"], 32, 1, "cpu")
    loss_of(model, {**batch, "hidden_states": batch["hidden_states"].requires_grad_()}).backward()
    concats = [c for c in found if c is not None]
    assert len(concats) == PRESETS["tiny"].config["num_single_layers"]
    assert all(len(c.parts) == 2 for c in concats)
    assert not compressor._parts  # registered parts last one forward

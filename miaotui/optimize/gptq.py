"""int4 with error compensation (GPTQ, Frantar et al. 2022), calibrated on text.

Rounding-to-nearest quantizes each weight alone. GPTQ quantizes a layer's input columns
one at a time and spreads each column's rounding error over the columns not yet
quantized, weighted by H = sum of x x^T over the layer's inputs on calibration text, so
that the layer's *outputs* on such inputs move least. Here the Hessians of every linear
layer are gathered in one pass of the float model (not layer by layer); columns go in
decreasing order of H's diagonal with each group's asymmetric grid fitted up front
(``quant._fit_asymmetric``). The result is an ordinary Int4Weight.
"""
from __future__ import annotations

import torch

from miaotui.layers.linear import Linear
from miaotui.layers.quant import Int4Weight, _fit_asymmetric, _pack_int4


@torch.inference_mode()
def collect_hessians(engine, ids: list[int], window: int = 512) -> dict[Linear, torch.Tensor]:
    """H = sum x x^T of each linear layer's inputs (all but the LM head) over the prompts
    ids[i:i + window], each run as a prefill that samples one token and stops."""
    from miaotui.sampling_params import SamplingParams
    model = engine.model
    hs: dict[Linear, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, Linear) and not name.endswith("lm_head") and mod.weight is not None:
            hs[mod] = torch.zeros(mod.in_features, mod.in_features, dtype=torch.float64)

            def hook(m, args):
                x = args[0].reshape(-1, m.in_features).double()
                hs[m].addmm_(x.t(), x)
            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        params = SamplingParams(max_tokens=1, ignore_eos=True)
        for i, b in enumerate(range(0, len(ids) - 1, window)):  # 2+ tokens: a prefill step
            engine.add_request(f"calib-{i}", ids[b:b + window], params)
        while engine.has_unfinished():
            engine.step()
    finally:
        for h in hooks:
            h.remove()
    return hs


def damped(w: torch.Tensor, h: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 copies of w [out, in] and h [in, in] ready for OBS updates: inputs never seen
    (zero H diagonal) get weight 0 and a unit diagonal, and damp x mean(diag H) is added to
    the diagonal so the Cholesky factorisations exist."""
    w = w.detach().double().clone()
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    return w, h


def inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of H^-1: row j holds the OBS update of the columns after j
    when column j is fixed (GPTQ and SparseGPT both walk it)."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def gptq_int4(w: torch.Tensor, h: torch.Tensor, group_size: int = 32, damp: float = 0.01,
              block: int = 128) -> Int4Weight:
    """w [out, in] float, h [in, in] -> Int4Weight (float16 scale and min per group).

    Columns go in order of decreasing H diagonal (the inputs with the most energy first,
    while the most columns are left to absorb their error); each group's grid is fitted up
    front on the float weights ("static groups"), so groups stay contiguous in the stored
    layout. On Gemma-3-270M this order gave +4.2% perplexity, column order with grids
    fitted as each group is reached +7.5%."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} must be a multiple of group_size {group_size}")
    w, h = damped(w, h, damp)
    s, m = _fit_asymmetric(w.float().view(n, k // group_size, group_size))
    scales, mins = s.to(torch.float16), m.to(torch.float16)
    perm = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, perm], h[perm][:, perm]
    group = perm // group_size                      # the stored group of each processed column
    hinv = inverse_cholesky(h)
    q = torch.zeros(n, k, dtype=torch.uint8)
    for b0 in range(0, k, block):
        b1 = min(k, b0 + block)
        errs = torch.zeros(n, b1 - b0, dtype=w.dtype)
        for j in range(b0, b1):
            gi = int(group[j])
            sd, md = scales[:, gi].double(), mins[:, gi].double()
            col = w[:, j]
            qj = torch.where(sd > 0, (col - md) / sd, 0.0).round().clamp(0, 15)
            q[:, perm[j]] = qj.to(torch.uint8)
            err = (col - (qj * sd + md)) / hinv[j, j]
            w[:, j + 1:b1] -= err[:, None] * hinv[j, j + 1:b1][None, :]
            errs[:, j - b0] = err
        w[:, b1:] -= errs @ hinv[b0:b1, b1:]
    return Int4Weight(_pack_int4(q), scales, mins, group_size, k)


def quantize_gptq(engine, ids: list[int], group_size: int = 32, window: int = 512,
                  progress: bool = True) -> int:
    """Quantize every float linear layer of the engine's model in place; returns how many."""
    from tqdm import tqdm
    hs = collect_hessians(engine, ids, window)
    for lin, h in tqdm(hs.items(), desc="GPTQ int4", disable=not progress, leave=False):
        lin.qweight = gptq_int4(lin.weight.data, h, group_size)
        lin.weight = None
    runner = engine.runner
    if runner.decoder is not None:  # it points at the float weights: rebuild it on the new ones
        from miaotui.engine.cpu_decoder import CPUDecoder
        runner.decoder = CPUDecoder.build(engine.model, runner.caches, runner.block_size)
    return len(hs)

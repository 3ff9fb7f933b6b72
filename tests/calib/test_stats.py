"""Calibration statistics gathered by hooks (``svdq.stats.collect_input_stats`` with the Megatron input
transform of ``lora.framework.full_input``) against statistics computed by hand from the same activations,
on a real Megatron GPT-MoE.

(a) Dense linears: the linear's input captured by a plain forward pre-hook (gathered by hand over the
    tensor-parallel ranks) → float64 ``XᵀX`` and absmax: absmax bit-exact, ``XᵀX`` to 1e-12 relative.
(b) Routed experts: the hidden states entering the MoE layer are routed by hand (top-k of the router
    logits ``x·W_rᵀ``, probabilities = softmax of the selected logits, in float64), each expert's tokens
    gathered in token order and its fc2 input computed by hand in float64 as
    ``p · silu(x·W_gateᵀ) ⊙ (x·W_upᵀ)`` (Megatron applies the router probability after the activation).
    fc1 statistics are exact (same values); fc2 statistics agree to float32 round-off (1e-5 relative).

With TP=2 (expert TP 2, no sequence parallelism) the allgather dispatcher hands every token to the
experts once per TP rank: the expert statistics are those of the duplicated token stream.
"""

import pytest
import torch
import torch.nn.functional as F

from calib.tiny_moe import TinyMoEConfig, build_tiny_gpt_moe, tiny_moe_batch
from lora.framework.parallel import init_parallel
from tests.helpers.spawn import run_on_processes

CFG = TinyMoEConfig(sequence_parallel=False)
SAMPLE = 4096  # larger than any layer's token count here: the reservoir keeps every token, in order


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    import torch.distributed as dist

    if group is None or dist.get_world_size(group) == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _full_fc1(linear) -> torch.Tensor:
    """Full GLU fc1 weight ``[gate; up]`` from the expert-TP shards ``[gate_k; up_k]`` (by hand)."""
    gate, up = linear.weight.detach().chunk(2, dim=0)
    return torch.cat([_gather(gate, 0, linear.tp_group), _gather(up, 0, linear.tp_group)], dim=0)


def _stats_worker(rank, world):
    from lora.framework.full_input import full_in_features, full_input
    from svdq.stats import collect_input_stats

    init_parallel(tensor_parallel=world)
    torch.set_num_threads(1)
    model = build_tiny_gpt_moe(CFG, seed=1)
    model.eval()
    batches = [tiny_moe_batch(CFG, batch=4, seed=s) for s in range(3)]

    def loop(m):
        for b in batches:
            m(b["tokens"], b["position_ids"], None)

    out = {"dense": {}, "experts": {}}
    for li, layer in enumerate(model.decoder.layers):
        attn, moe = layer.self_attention, layer.mlp.experts
        dense = {f"L{li}.qkv": attn.linear_qkv, f"L{li}.proj": attn.linear_proj}
        linears = dict(dense)
        for i, e in enumerate(moe.local_experts):
            linears[f"L{li}.e{i}.fc1"] = e.linear_fc1
            linears[f"L{li}.e{i}.fc2"] = e.linear_fc2
        captured = {name: [] for name in [*dense, "moe_in"]}

        def capture(name, captured=captured):
            return lambda m, a: captured[name].append(a[0].detach().clone())

        handles = [lin.register_forward_pre_hook(capture(name)) for name, lin in dense.items()]
        handles.append(layer.mlp.register_forward_pre_hook(capture("moe_in")))
        try:
            stats = collect_input_stats(
                model, linears, loop, SAMPLE, transform=full_input, in_features=full_in_features
            )
        finally:
            for h in handles:
                h.remove()

        # (a) dense: the full input by hand (row-parallel proj: features gathered over the TP ranks)
        for name, lin in dense.items():
            X = torch.cat([x.reshape(-1, x.shape[-1]) for x in captured[name]])
            if name.endswith("proj"):
                X = _gather(X, 1, lin.tp_group)
            st = stats[name]
            X64 = X.double()
            out["dense"][name] = {
                "n": (st.n_tokens, X.shape[0]),
                "absmax_equal": torch.equal(st.absmax, X.abs().amax(0)),
                "gram_rel": _rel(st.gram, X64.T @ X64),
                "sample_equal": torch.equal(st.sample, X),
            }

        # (b) experts: route by hand, per batch, the tokens in Megatron's order (expert-major, token order)
        Wr = layer.mlp.router.weight.detach()
        per_expert = {i: ([], []) for i in range(len(moe.local_experts))}  # fc1 inputs, fc2 inputs (f64)
        W1 = [_full_fc1(e.linear_fc1).double() for e in moe.local_experts]
        margins = []
        for h in captured["moe_in"]:
            x = h.reshape(-1, h.shape[-1])
            logits = F.linear(x, Wr)  # float32, as Megatron's router (moe_router_dtype unset)
            top = torch.topk(logits, CFG.topk + 1, dim=1).values
            margins.append((top[:, CFG.topk - 1] - top[:, CFG.topk]).min().item())
            idx = torch.topk(logits, CFG.topk, dim=1).indices
            probs = torch.softmax(torch.gather(x.double() @ Wr.double().T, 1, idx), dim=1)
            for e in per_expert:
                sel = (idx == e).any(1)
                xe = x[sel]
                pe = (probs * (idx == e)).sum(1)[sel]
                gate, up = (xe.double() @ W1[e].T).chunk(2, dim=1)
                inter = F.silu(gate) * up * pe.unsqueeze(1)
                # each TP rank holds the whole sequence: the dispatcher gathers it once per TP rank
                per_expert[e][0].extend([xe] * world)
                per_expert[e][1].extend([inter] * world)
        for e, (xs, inters) in per_expert.items():
            X1, X2 = torch.cat(xs), torch.cat(inters)
            s1, s2 = stats[f"L{li}.e{e}.fc1"], stats[f"L{li}.e{e}.fc2"]
            X1d = X1.double()
            out["experts"][f"L{li}.e{e}"] = {
                "n": (s1.n_tokens, s2.n_tokens, X1.shape[0]),
                "fc1_absmax_equal": torch.equal(s1.absmax, X1.abs().amax(0)),
                "fc1_gram_rel": _rel(s1.gram, X1d.T @ X1d),
                "fc1_sample_equal": torch.equal(s1.sample, X1),
                "fc2_absmax_rel": _rel(s2.absmax, X2.abs().amax(0)),
                "fc2_gram_rel": _rel(s2.gram, X2.T @ X2),
                "fc2_sample_rel": _rel(s2.sample, X2),
            }
        out["margin"] = min(margins)
    return out


def _check(r, world):
    assert r["margin"] > 1e-4  # no near-tie in the top-k: the hand routing is unambiguous
    assert len(r["dense"]) == 2 * CFG.num_layers
    for name, d in r["dense"].items():
        assert d["n"][0] == d["n"][1] == 3 * 4 * CFG.seq_len, name
        assert d["absmax_equal"] and d["sample_equal"], name
        assert d["gram_rel"] < 1e-12, (name, d)
    assert len(r["experts"]) == CFG.num_layers * CFG.num_experts
    routed = 0
    for name, d in r["experts"].items():
        n1, n2, n_hand = d["n"]
        assert n1 == n2 == n_hand > 0, (name, d["n"])
        routed += n_hand
        assert d["fc1_absmax_equal"] and d["fc1_sample_equal"], name
        assert d["fc1_gram_rel"] < 1e-12, (name, d)
        for key in ("fc2_absmax_rel", "fc2_gram_rel", "fc2_sample_rel"):
            assert d[key] < 1e-5, (name, key, d)
    # every token reaches top-k experts (once per TP rank)
    assert routed == CFG.num_layers * CFG.topk * 3 * 4 * CFG.seq_len * world


def test_hook_statistics_equal_hand_computed_statistics():
    (r,) = run_on_processes(_stats_worker, 1, timeout=240)
    _check(r, 1)


@pytest.mark.slow
def test_hook_statistics_equal_hand_computed_statistics_tensor_parallel_2():
    ranks = run_on_processes(_stats_worker, 2, timeout=400)
    for r in ranks:
        _check(r, 2)

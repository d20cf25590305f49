# PyTorch peer for `npm run bench:train`: the same Mixtral-architecture MoE (HF MixtralSparseMoeBlock semantics:
# softmax router, top-k, renormalise, SwiGLU experts, load-balancing loss), trained with AdamW on random token
# windows; prints training tokens/s as JSON. Debian's python3-torch is a development-only peer.
import json, sys, time, torch, torch.nn as nn, torch.nn.functional as F

cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg['threads'])
torch.manual_seed(0)
V, D, L, H, KV, HD, FF, E, K = (cfg[k] for k in ['vocab', 'dim', 'layers', 'heads', 'kv_heads', 'head_dim', 'ffn', 'experts', 'k'])
T, B, STEPS, WARM = cfg['seq_len'], cfg['batch'], cfg['steps'], cfg['warmup']

class RMSNorm(nn.Module):
    def __init__(s, d): super().__init__(); s.w = nn.Parameter(torch.ones(d))
    def forward(s, x): return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * s.w

def rope(x, pos):  # HF rotate_half
    d = x.shape[-1]
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2).float() / d))
    f = torch.outer(pos.float(), inv); emb = torch.cat([f, f], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()

class Block(nn.Module):
    def __init__(s):
        super().__init__()
        s.n1, s.n2 = RMSNorm(D), RMSNorm(D)
        s.q, s.k, s.v, s.o = nn.Linear(D, H * HD, bias=False), nn.Linear(D, KV * HD, bias=False), nn.Linear(D, KV * HD, bias=False), nn.Linear(H * HD, D, bias=False)
        s.gate = nn.Linear(D, E, bias=False)
        s.w1 = nn.Parameter(torch.randn(E, FF, D) * 0.02); s.w3 = nn.Parameter(torch.randn(E, FF, D) * 0.02); s.w2 = nn.Parameter(torch.randn(E, D, FF) * 0.02)
    def forward(s, x):
        b, t, _ = x.shape
        h = s.n1(x); pos = torch.arange(t)
        q = rope(s.q(h).view(b, t, H, HD).transpose(1, 2), pos)
        k = rope(s.k(h).view(b, t, KV, HD).transpose(1, 2), pos)
        v = s.v(h).view(b, t, KV, HD).transpose(1, 2)
        k = k.repeat_interleave(H // KV, 1); v = v.repeat_interleave(H // KV, 1)
        # torch 1.13 has no scaled_dot_product_attention: the plain causal softmax attention.
        att = (q @ k.transpose(-2, -1)) / HD ** 0.5
        att = att.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float('-inf')).softmax(-1)
        a = (att @ v).transpose(1, 2).reshape(b, t, H * HD)
        x = x + s.o(a)
        h = s.n2(x).view(-1, D)
        logits = s.gate(h); probs = logits.softmax(-1)
        w, sel = probs.topk(K, -1); w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(h)
        for e in range(E):  # grouped: one GEMM per expert over its tokens (HF's loop)
            idx, slot = (sel == e).nonzero(as_tuple=True)
            if idx.numel() == 0: continue
            xe = h[idx]
            ye = (F.silu(xe @ s.w1[e].T) * (xe @ s.w3[e].T)) @ s.w2[e].T
            out.index_add_(0, idx, ye * w[idx, slot, None])
        f = F.one_hot(sel, E).float().sum(1).mean(0); P = probs.mean(0)
        return x + out.view(b, t, D), E * (f * P).sum()

class Model(nn.Module):
    def __init__(s):
        super().__init__()
        s.emb = nn.Embedding(V, D); s.blocks = nn.ModuleList(Block() for _ in range(L)); s.norm = RMSNorm(D)
    def forward(s, ids):
        x = s.emb(ids); aux = 0
        for blk in s.blocks: x, a = blk(x); aux = aux + a
        return s.norm(x) @ s.emb.weight.T, aux

m = Model()
opt = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
data = torch.randint(3, V, (200_000,))
def step():
    starts = torch.randint(0, data.numel() - T - 1, (B,))
    x = torch.stack([data[i : i + T] for i in starts]); y = torch.stack([data[i + 1 : i + T + 1] for i in starts])
    logits, aux = m(x)
    loss = F.cross_entropy(logits.view(-1, V), y.view(-1)) + 0.02 * aux
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step()
for _ in range(WARM): step()
t0 = time.perf_counter()
for _ in range(STEPS): step()
dt = time.perf_counter() - t0
# Which BLAS Debian's torch got (it links libblas.so.3: the reference BLAS unless OpenBLAS is installed): an sgemm rate.
a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
a @ b; t1 = time.perf_counter(); a @ b; a @ b; sgemm = 2 * 2 * 512 * 1024 * 1024 / (time.perf_counter() - t1) / 1e9
print(json.dumps({'tokens_per_s': STEPS * B * T / dt, 'seconds': dt, 'torch': torch.__version__, 'threads': torch.get_num_threads(), 'sgemm_gflops': sgemm}))

#!/usr/bin/env python3
"""Generate small PEFT reference fixtures for ftune's parity tests.

Needs PyTorch, transformers and PEFT (made with torch 2.11, transformers 5.17, PEFT 0.21),
runs on the CPU in float32:

    python3 tools/make_reference.py --out tests/fixtures            # all fixtures
    python3 tools/make_reference.py --out tests/fixtures --only qwen2_tiny

Each fixture directory <out>/<name>/ holds (same layout as shared/data/reference/llama_tiny):

    model/                HF model dir (config.json + safetensors, random init, fixed seed)
    init_adapter/         PEFT adapter the run starts from (lora_B non-zero)
    data/train.jsonl      {"input_ids": [...], "labels": [...]} per line ("labels" may be absent:
                          then labels = input_ids)
    run.json              hyper-parameters
    expected/losses.json       loss of each optimizer step, before its update
    expected/grad_norms.json   pre-clip global grad norm of each step
    expected/lrs.json          learning rate used by each step
    expected/peft/             PEFT adapter after `steps` optimizer steps

Semantics of a run (what ftune must reproduce):
  * examples in file order, no shuffling; a micro-batch is `mbs` consecutive examples,
    right-padded with id 0 (labels -100, attention mask 0 on padding); an optimizer step takes
    `gas` micro-batches; steps*mbs*gas <= number of lines (no wrap-around);
  * loss of a step = sum of token cross-entropies over all label tokens of its micro-batches
    (logits[:, :-1] against labels[:, 1:]) / number of those tokens; the count is taken over the
    whole step first, then each micro-batch backwards its (sum CE / count);
  * clip_grad_norm_(trainable, clip) (its pre-clip norm is recorded), then
    torch.optim.AdamW(lr, betas, eps, weight_decay=wd) on all LoRA parameters, scheduler from
    transformers.get_scheduler(type, num_warmup_steps, num_training_steps=steps) stepped after
    each optimizer step; the lr recorded for a step is scheduler.get_last_lr()[0] before
    optimizer.step().

The embedding scale (or, failing that, the weight scale) of each fixture is picked from a list of
candidates so that gradient clipping
triggers on some steps but not on all of them; the search is deterministic, so a re-run writes the
same fixtures.
"""

import argparse
import json
import math
import os
import random
import shutil
import sys

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Weights of the linear layers are N(0, SIGMA^2) (config initializer_range): with normalized inputs
# of width 64 that gives q/k/gate/up entries of about 0.8, so attention scores and SiLU are far
# from their linear regime and rope/mask/activation mistakes show in the losses.
SIGMA = 0.1
# The token embedding's std sets the residual stream's scale and so, through the RMSNorms, the
# gradient scale. Candidates in the order tried (ascending: gradients shrink as it grows); the first
# whose grad norms exceed `clip` on a fraction of the steps in [0.25, 0.75] wins, else the one
# closest to half of the steps clipped.
# Fallback (if no embedding scale gives mixed clipping): smaller weights everywhere.
CANDIDATES = ([(SIGMA, round(0.1 * 1.12 ** i, 4)) for i in range(28)]  # emb 0.1 .. ~2.1
              + [(s, s) for s in (0.08, 0.064, 0.05, 0.04, 0.03, 0.02, 0.015, 0.01)])

FIXTURES = {
    # Qwen2: q/k/v biases (random, non-zero), tied embeddings, default rope theta 1e6, GQA 4/2.
    "qwen2_tiny": dict(
        arch="qwen2",
        config=dict(
            vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            bos_token_id=1, eos_token_id=2,
        ),
        save_dtype="float32", max_shard_size=None,
        n_lines=32, no_label_every=0, multi_span_every=0,
        run=dict(r=8, alpha=16, mbs=2, gas=2, steps=8, lr=5e-3, wd=0.1, clip=0.5, seed=11,
                 target_modules=ALL_TARGETS, lr_scheduler_type="cosine", warmup_steps=2,
                 use_rslora=False),
    ),
    # Llama: untied, linear rope scaling, MQA (4 heads / 1 KV head), bf16 weights in >= 2 shards,
    # three target modules only, rsLoRA, some lines without "labels".
    "llama_rslora": dict(
        arch="llama",
        config=dict(
            vocab_size=256, hidden_size=64, intermediate_size=144, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, head_dim=16,
            max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
            attention_bias=False, mlp_bias=False,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
            bos_token_id=1, eos_token_id=2,
        ),
        save_dtype="bfloat16", max_shard_size="100KB",
        n_lines=20, no_label_every=3, multi_span_every=0,
        run=dict(r=4, alpha=8, mbs=1, gas=3, steps=6, lr=3e-3, wd=0.0, clip=1.0, seed=23,
                 target_modules=["q_proj", "v_proj", "down_proj"], lr_scheduler_type="linear",
                 warmup_steps=1, use_rslora=True),
    ),
    # Qwen3: q_norm/k_norm (random weights around 1), untied, 8 heads x head_dim 16 = 128 != hidden 64
    # (so q_proj is 64->128 and o_proj 128->64), GQA 8/2, constant lr, some labels with two spans.
    "qwen3_tiny": dict(
        arch="qwen3",
        config=dict(
            vocab_size=288, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
            attention_bias=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            bos_token_id=1, eos_token_id=2,
        ),
        save_dtype="float32", max_shard_size=None,
        n_lines=16, no_label_every=0, multi_span_every=4,
        run=dict(r=4, alpha=16, mbs=2, gas=1, steps=5, lr=4e-3, wd=0.01, clip=1.0, seed=37,
                 target_modules=ALL_TARGETS, lr_scheduler_type="constant", warmup_steps=0,
                 use_rslora=False),
    ),
}

RUN_KEYS = ["r", "alpha", "mbs", "gas", "steps", "lr", "wd", "clip", "seed", "lora_dropout",
            "target_modules", "shuffle", "lr_scheduler_type", "warmup_steps", "adam_beta1",
            "adam_beta2", "adam_epsilon", "use_rslora"]


PROBLEMS = []  # soft failures, reported at the end (exit status 1)


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------------------- data
def make_data(spec):
    """Pre-tokenized lines: random ids in [3, vocab), lengths 10..40, a masked prompt prefix."""
    run = spec["run"]
    vocab = spec["config"]["vocab_size"]
    rng = random.Random(1000 + run["seed"])
    lines = []
    for i in range(spec["n_lines"]):
        n = rng.randint(10, 40)
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        if spec["no_label_every"] and i % spec["no_label_every"] == 1:
            lines.append({"input_ids": ids})  # labels = input_ids
            continue
        p = rng.randint(2, n // 2)
        labels = [-100] * p + ids[p:]
        if spec["multi_span_every"] and i % spec["multi_span_every"] == 2 and n - p >= 8:
            # a second masked span in the middle (like a multi-turn conversation)
            a = p + (n - p) // 3
            for j in range(a, a + 3):
                labels[j] = -100
        lines.append({"input_ids": ids, "labels": labels})
    need = run["steps"] * run["mbs"] * run["gas"]
    assert need <= len(lines), (need, len(lines))
    return lines


def write_jsonl(path, lines):
    with open(path, "w") as f:
        for ex in lines:
            f.write(json.dumps(ex) + "\n")


def write_json(path, obj, indent=None):
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


# ---------------------------------------------------------------------------------------- model
def model_classes(arch):
    import transformers as T
    return {
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
        "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM),
        "llama": (T.LlamaConfig, T.LlamaForCausalLM),
    }[arch]


def build_model(spec, sigma, emb_std, model_dir):
    """Random model with our own seeded init (independent of HF's _init_weights), saved to disk."""
    import torch
    cfg_cls, model_cls = model_classes(spec["arch"])
    tied = bool(spec["config"].get("tie_word_embeddings"))
    cfg = cfg_cls(initializer_range=sigma, **spec["config"])
    torch.manual_seed(spec["run"]["seed"])
    model = model_cls(cfg).to(torch.float32)
    g = torch.Generator().manual_seed(spec["run"]["seed"])
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):  # tied lm_head is listed once
            if name.endswith("norm.weight"):  # input/post_attention_layernorm, norm, q_norm, k_norm
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(2.0 * sigma * torch.randn(p.shape, generator=g))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(emb_std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(sigma * torch.randn(p.shape, generator=g))
        if tied:
            # lm_head is the embedding (std emb_std): scale the final norm so that logits keep
            # the spread they would have with an lm_head of std SIGMA.
            model.model.norm.weight.mul_(sigma / emb_std)
    if tied and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        PROBLEMS.append(f"{model_dir}: lm_head not tied to embed_tokens after construction")
    if spec["save_dtype"] == "bfloat16":
        model = model.to(torch.bfloat16)
    kw = {}
    if spec["max_shard_size"]:
        kw["max_shard_size"] = spec["max_shard_size"]
    model.save_pretrained(model_dir, **kw)


def load_model(model_dir):
    import torch
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                             attn_implementation="eager")
    for n, p in m.named_parameters():
        assert p.dtype == torch.float32, (n, p.dtype)
    return m


def clean_adapter_dir(d):
    """Drop PEFT's model card and the (machine-specific) base model path."""
    readme = os.path.join(d, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    cp = os.path.join(d, "adapter_config.json")
    with open(cp) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = None
    with open(cp, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def make_init_adapter(spec, model_dir, init_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    run = spec["run"]
    base = load_model(model_dir)
    cfg = LoraConfig(r=run["r"], lora_alpha=run["alpha"], target_modules=list(run["target_modules"]),
                     lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                     use_rslora=run["use_rslora"])
    torch.manual_seed(run["seed"])
    pm = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(run["seed"] + 1)
    n_b = 0
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters()):
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
                n_b += 1
    assert n_b == len(run["target_modules"]) * spec["config"]["num_hidden_layers"], n_b
    pm.save_pretrained(init_dir)
    clean_adapter_dir(init_dir)


# ---------------------------------------------------------------------------------------- train
def micro_batches(lines, mbs, n):
    import torch
    out = []
    for b in range(n):
        exs = lines[b * mbs:(b + 1) * mbs]
        L = max(len(e["input_ids"]) for e in exs)
        ids = torch.zeros(len(exs), L, dtype=torch.long)
        lab = torch.full((len(exs), L), -100, dtype=torch.long)
        att = torch.zeros(len(exs), L, dtype=torch.long)
        for i, e in enumerate(exs):
            x = e["input_ids"]
            y = e.get("labels", x)
            assert len(y) == len(x)
            ids[i, :len(x)] = torch.tensor(x)
            lab[i, :len(x)] = torch.tensor(y)
            att[i, :len(x)] = 1
        out.append((ids, att, lab))
    return out


def train(spec, model_dir, init_dir, lines):
    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import get_scheduler
    run = spec["run"]
    base = load_model(model_dir)
    if spec["config"].get("tie_word_embeddings"):
        if base.lm_head.weight.data_ptr() != base.model.embed_tokens.weight.data_ptr():
            PROBLEMS.append(f"{model_dir}: loaded lm_head is not tied to embed_tokens")
    pm = PeftModel.from_pretrained(base, init_dir, is_trainable=True)
    named = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    assert named and all("lora_" in n for n, _ in named), [n for n, _ in named]
    assert len(named) == 2 * len(run["target_modules"]) * spec["config"]["num_hidden_layers"]
    params = [p for _, p in named]
    pm.train()

    mbs_all = micro_batches(lines, run["mbs"], run["steps"] * run["gas"])

    # Cross-check step 0's loss with HF's own loss (num_items_in_batch = token count of the step).
    hf_loss0 = None
    try:
        with torch.no_grad():
            first = mbs_all[:run["gas"]]
            cnt = sum(int((lab[:, 1:] != -100).sum()) for _, _, lab in first)
            hf_loss0 = 0.0
            for ids, att, lab in first:
                out = pm(input_ids=ids, attention_mask=att, labels=lab, use_cache=False,
                         num_items_in_batch=torch.tensor(cnt))
                hf_loss0 += float(out.loss)
    except Exception as e:  # informative only
        log(f"  (HF loss cross-check skipped: {type(e).__name__}: {e})")
        hf_loss0 = None

    opt = torch.optim.AdamW(params, lr=run["lr"], betas=(run["adam_beta1"], run["adam_beta2"]),
                            eps=run["adam_epsilon"], weight_decay=run["wd"])
    sched = get_scheduler(run["lr_scheduler_type"], opt, num_warmup_steps=run["warmup_steps"],
                          num_training_steps=run["steps"])
    losses, norms, lrs = [], [], []
    for s in range(run["steps"]):
        step_mbs = mbs_all[s * run["gas"]:(s + 1) * run["gas"]]
        count = sum(int((lab[:, 1:] != -100).sum()) for _, _, lab in step_mbs)
        assert count > 0
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for ids, att, lab in step_mbs:
            logits = pm(input_ids=ids, attention_mask=att, use_cache=False).logits
            ce = F.cross_entropy(logits[:, :-1, :].reshape(-1, logits.shape[-1]).float(),
                                 lab[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
            loss = ce / count
            loss.backward()
            loss_sum += float(loss.detach())
        norm = torch.nn.utils.clip_grad_norm_(params, run["clip"])
        lrs.append(float(sched.get_last_lr()[0]))
        opt.step()
        sched.step()
        losses.append(loss_sum)
        norms.append(float(norm))
    return pm, dict(losses=losses, grad_norms=norms, lrs=lrs, hf_loss0=hf_loss0)


def verify_saved(model_dir, peft_dir, pm):
    """Reload the saved adapter and check it equals the trained one bit for bit."""
    import torch
    from peft import PeftModel
    base = load_model(model_dir)
    re = PeftModel.from_pretrained(base, peft_dir)
    want = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    got = {n: p for n, p in re.named_parameters() if "lora_" in n}
    assert set(want) == set(got), (sorted(set(want) ^ set(got)))[:4]
    for n in want:
        assert torch.equal(want[n].detach(), got[n].detach()), n


# ------------------------------------------------------------------------------------- fixture
def run_json(spec):
    run = dict(spec["run"])
    run.update(lora_dropout=0.0, shuffle=False, adam_beta1=0.9, adam_beta2=0.999,
               adam_epsilon=1e-8)
    return {k: run[k] for k in RUN_KEYS}


def build_fixture(name, spec, sigma, emb_std, d):
    if os.path.exists(d):
        shutil.rmtree(d)
    for sub in ("model", "init_adapter", "data", "expected"):
        os.makedirs(os.path.join(d, sub))
    spec = dict(spec)
    spec["run"] = run_json(spec)
    lines = make_data(spec)
    write_jsonl(os.path.join(d, "data", "train.jsonl"), lines)
    write_json(os.path.join(d, "run.json"), spec["run"], indent=1)
    model_dir = os.path.join(d, "model")
    init_dir = os.path.join(d, "init_adapter")
    build_model(spec, sigma, emb_std, model_dir)
    make_init_adapter(spec, model_dir, init_dir)
    pm, res = train(spec, model_dir, init_dir, lines)
    peft_dir = os.path.join(d, "expected", "peft")
    pm.save_pretrained(peft_dir)
    clean_adapter_dir(peft_dir)
    verify_saved(model_dir, peft_dir, pm)
    write_json(os.path.join(d, "expected", "losses.json"), res["losses"])
    write_json(os.path.join(d, "expected", "grad_norms.json"), res["grad_norms"])
    write_json(os.path.join(d, "expected", "lrs.json"), res["lrs"])
    return res


def check_model_dir(name, spec, d):
    """Facts about the saved model dir worth knowing (and asserting)."""
    from safetensors import safe_open
    md = os.path.join(d, "model")
    files = sorted(os.listdir(md))
    st = [f for f in files if f.endswith(".safetensors")]
    keys, dtypes = [], set()
    for f in st:
        with safe_open(os.path.join(md, f), "pt") as h:
            for k in h.keys():
                keys.append(k)
                dtypes.add(str(h.get_slice(k).get_dtype()))
    log(f"  model files: {files}")
    log(f"  tensors: {len(keys)}, dtypes {sorted(dtypes)}, lm_head.weight saved: "
        f"{'lm_head.weight' in keys}, biases: {sorted(k for k in keys if k.endswith('.bias'))[:3]}")
    if spec["max_shard_size"]:
        assert "model.safetensors.index.json" in files, files
        assert len(st) >= 2, st
    if spec["save_dtype"] == "bfloat16":
        assert dtypes == {"BF16"}, dtypes
    with open(os.path.join(md, "config.json")) as f:
        log("  config.json: " + json.dumps(json.load(f), sort_keys=True))


def dir_size(d):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def make_one(out, name):
    spec = FIXTURES[name]
    clip = spec["run"]["clip"]
    final = os.path.join(out, name)
    best = None  # (score, idx, (sigma, emb_std), res, dir)
    for idx, (sigma, emb_std) in enumerate(CANDIDATES):
        tmp = os.path.join(out, f".{name}.try{idx}")
        res = build_fixture(name, spec, sigma, emb_std, tmp)
        frac = sum(n > clip for n in res["grad_norms"]) / len(res["grad_norms"])
        log(f"{name}: std {sigma}, embedding std {emb_std}: clipped {frac:.2f} of steps, grad norms "
            + " ".join(f"{n:.3f}" for n in res["grad_norms"]))
        score = abs(frac - 0.5)
        if best is None or score < best[0]:
            if best is not None:
                shutil.rmtree(best[4])
            best = (score, idx, (sigma, emb_std), res, tmp)
        else:
            shutil.rmtree(tmp)
        if 0.25 <= frac <= 0.75:
            break
    _, idx, (sigma, emb_std), res, tmp = best
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    log(f"== {name}: std {sigma}, embedding std {emb_std} (candidate {idx})")
    if not 0 < sum(n > clip for n in res["grad_norms"]) < len(res["grad_norms"]):
        PROBLEMS.append(f"{name}: clipping did not trigger on some but not all steps")
    try:
        check_model_dir(name, spec, final)
    except AssertionError as e:
        PROBLEMS.append(f"{name}: model dir check failed: {e!r}")
    from safetensors import safe_open
    for sub in ("init_adapter", "expected/peft"):
        ad = os.path.join(final, sub)
        log(f"  {sub}: {sorted(os.listdir(ad))}")
        with safe_open(os.path.join(ad, "adapter_model.safetensors"), "pt") as h:
            keys = sorted(h.keys())
            dts = sorted({str(h.get_slice(k).get_dtype()) for k in keys})
            log(f"    {len(keys)} tensors {dts}, e.g. {keys[0]} {h.get_slice(keys[0]).get_shape()}")
    if res["hf_loss0"] is not None:
        diff = abs(res["hf_loss0"] - res["losses"][0])
        log(f"  HF loss cross-check, step 0: {res['hf_loss0']:.8f} vs {res['losses'][0]:.8f} "
            f"(diff {diff:.2e})")
        if diff > 1e-5 * max(1.0, abs(res["losses"][0])):
            PROBLEMS.append(f"{name}: HF loss differs from ours at step 0 by {diff}")
    size = dir_size(final)
    log(f"  size: {size} bytes")
    if size >= 1_000_000:
        PROBLEMS.append(f"{name}: fixture is {size} bytes")
    return dict(sigma=sigma, emb_std=emb_std, clip=clip, **{k: res[k] for k in ("losses", "grad_norms", "lrs")})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory to write <out>/<fixture>/ into")
    ap.add_argument("--only", action="append", choices=sorted(FIXTURES),
                    help="make only this fixture (repeatable)")
    args = ap.parse_args()

    import torch
    import transformers
    import peft
    torch.use_deterministic_algorithms(True)
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")

    os.makedirs(args.out, exist_ok=True)
    summary = {}
    for name in args.only or list(FIXTURES):
        try:
            s = make_one(args.out, name)
        except Exception:
            import traceback
            traceback.print_exc()
            PROBLEMS.append(f"{name}: failed with an exception (traceback above)")
            continue
        summary[name] = s

    log("\n%-14s %4s %12s %12s %12s %s" % ("fixture", "step", "loss", "grad_norm", "lr", "clipped"))
    for name, s in summary.items():
        for i, (l, n, lr) in enumerate(zip(s["losses"], s["grad_norms"], s["lrs"])):
            log("%-14s %4d %12.6f %12.6f %12.4e %s" % (name, i, l, n, lr,
                                                       "yes" if n > s["clip"] else ""))
    log("\nSUMMARY " + json.dumps(summary))
    for p in PROBLEMS:
        log("PROBLEM: " + p)
    return 1 if PROBLEMS else 0


if __name__ == "__main__":
    sys.exit(main())

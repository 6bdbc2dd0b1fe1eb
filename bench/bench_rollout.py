#!/usr/bin/env python
"""Rollout and PPO-step benchmark: batched generation vs the reference's one-prompt-at-a-time loop.

Measured side by side in one run, repetitions interleaved (the order alternates every repetition), medians
reported with their ratio:

1. **tiny world** (``--preset tiny`` models): a PPO batch of 16 train prompts, per-row ``max_new_tokens``
   drawn by the preset's LengthSampler; EOS is suppressed up to each row's limit so both ways generate the
   very same number of tokens.
2. **flan-t5-base architecture** (random weights from the published config, LoRA r=32 on q and v as in the
   reference; no download): 16 synthetic prompts of DialogSum-like length (150-250 token ids),
   min = max = 64 new tokens per row (a random model would otherwise stop at random lengths).

"Batched" is one ``harness.ppo.rollout.generate`` call for the batch (per-row seeds and limits).
"One at a time" is the reference notebook's loop: ``model.generate`` per prompt with ``do_sample=True,
top_k=0, top_p=1.0`` and that prompt's length, then ``decode``. Same model object, same lengths.

3. **One full PPO step** on the flan-t5-base architecture at batch 16 (the reference's PPO settings from the
   ``flan-t5-base`` preset): generation (batched, 64 new tokens), scoring (the *tiny* classifier: the real
   one is a download), update (``ppo_step``), and the peak memory, in two child processes: the harness's
   reference (the LoRA adapter disabled, no copy) and the reference notebook's (a separate frozen deepcopy
   of the base). Peak memory on CPU is the child's RSS high-water mark (``resource.getrusage``,
   ``ru_maxrss``); on CUDA it is ``torch.cuda.max_memory_allocated`` (torch's allocations only).

Usage::

    python bench/bench_rollout.py --quick                 # ~6 minutes on a 2-core CPU
    python bench/bench_rollout.py --device cuda --json bench.json

Set ``DETOX_HARNESS_CACHE`` to reuse a built tiny world.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from harness.attention import use_shared_bias_attention  # noqa: E402
from harness.config import REFERENCE_PROMPT, load_config  # noqa: E402
from harness.models import (  # noqa: E402
    PolicyWithValueHead,
    ValueHead,
    fuse_activations,
    load_policy,
    resolve_device,
    resolve_dtype,
)
from harness.plan import concrete  # noqa: E402
from harness.ppo.rollout import LengthSampler, generate  # noqa: E402
from harness.ppo.step import PPOState, ppo_step, random_orders  # noqa: E402
from harness.toxicity import Classifier, reward_texts  # noqa: E402

BATCH = 16  # the reference's PPO batch
# google/flan-t5-base config.json: the architecture only
FLAN_T5_BASE = dict(d_model=768, d_ff=2048, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12,
                    vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.1)
FLAN_NEW_TOKENS = 64  # min = max new tokens per row for the random flan-t5-base architecture
PROMPT_TOKENS = (150, 250)  # DialogSum prompts are ~200 flan-t5 tokens
TARGETS = {"tiny": 10.0, "flan-t5-base": 6.0}  # the speed-up targets (batched vs one at a time)
REPS = {"tiny": (10, 5), "flan-t5-base": (5, 2)}  # repetitions (full, --quick)
SEED = 1234


# ------------------------------------------------------------------------------------ helpers

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_mb() -> float:
    """Current resident set size (Linux /proc), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    """RSS high-water mark of this process (ru_maxrss: KiB on Linux, bytes on macOS), MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class SyntheticTokenizer:
    """Stands in for flan-t5's tokenizer (a download): ids -> the tiny world's T5 pieces, so texts have length.

    Only what ``generate`` and the scoring need: pad/eos ids, ``decode`` and ``batch_decode``.
    """

    pad_token_id, eos_token_id = 0, 1

    def __init__(self, tiny_tokenizer):
        self.tiny = tiny_tokenizer
        self.size = len(tiny_tokenizer)

    def _map(self, ids) -> list[int]:
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return [i if i < 3 else 3 + (i - 3) % (self.size - 3) for i in ids]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tiny.decode(self._map(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]


def synthetic_prompts(n: int, seed: int = SEED) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(*PROMPT_TOKENS)
        out.append([rng.randrange(3, FLAN_T5_BASE["vocab_size"]) for _ in range(length - 1)] + [1])
    return out


def build_flan_policy(device: torch.device, dtype: torch.dtype, reference: str, tokenizer) -> PolicyWithValueHead:
    """flan-t5-base (random weights) + the reference's LoRA + value head; reference = adapter off, or a copy."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(SEED)
    p = load_config("flan-t5-base").policy
    base = T5ForConditionalGeneration(T5Config(**FLAN_T5_BASE))
    if base.lm_head.weight is base.shared.weight:  # transformers 5 ties; flan-t5-base's checkpoint does not
        base.lm_head.weight = torch.nn.Parameter(base.shared.weight.detach().clone())
    fuse_activations(base)  # as harness.models.load_policy does
    use_shared_bias_attention(base)
    base = base.to(device=device, dtype=dtype).eval()
    ref_model = None
    if reference == "copy":
        ref_model = copy.deepcopy(base).eval()
        for q in ref_model.parameters():
            q.requires_grad_(False)
    lora = LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, target_modules=list(p.lora_target_modules),
                      lora_dropout=0.0, bias="none", task_type=TaskType.SEQ_2_SEQ_LM)
    model = get_peft_model(base, lora)  # as harness.models.load_policy does (peft keeps LoRA in float32)
    cls = CopyReferencePolicy if reference == "copy" else PolicyWithValueHead
    policy = cls(model, ValueHead(FLAN_T5_BASE["d_model"]), ref_model=ref_model, tokenizer=tokenizer).to(device)
    policy.value_head.to(torch.float32)
    return policy.eval()


class CopyReferencePolicy(PolicyWithValueHead):
    """The reference notebook's way: reference log-probs from a separate frozen copy of the base."""

    @contextlib.contextmanager
    def reference(self):
        yield self.ref_model


def tiny_world(device: torch.device):
    """The tiny preset's policy, tokenizer, classifier and a PPO batch of prompts with per-row limits."""
    from harness.tiny import resolve

    cfg = concrete(load_config("tiny"))
    torch.manual_seed(cfg.seed)
    policy = load_policy(cfg.policy, device=device)
    tok = policy.tokenizer
    rows = [json.loads(line) for line in (resolve("tiny://dialogues") / "train.jsonl").read_text().splitlines()]
    rows = [r for r in rows if cfg.data.min_chars < len(r["dialogue"]) < cfg.data.max_chars][:BATCH]
    prompts = [tok(REFERENCE_PROMPT.format(dialogue=r["dialogue"]), truncation=True,
                   max_length=cfg.data.max_prompt_tokens)["input_ids"] for r in rows]
    limits = LengthSampler(cfg.rollout.length_min, cfg.rollout.length_max, seed=SEED).sample(len(prompts))
    return cfg, policy, tok, prompts, limits


# ------------------------------------------------------------------------------------ generation

def run_batched(policy, tok, prompts, limits, device) -> tuple[float, int]:
    sync(device)
    t = time.perf_counter()
    roll = generate(policy.model, tok, prompts, max_new_tokens=limits, seeds=[SEED + i for i in range(len(prompts))],
                    min_new_tokens=max(limits), top_k=0, top_p=1.0, device=device)
    sync(device)
    return time.perf_counter() - t, sum(roll.lengths)


def run_one_at_a_time(policy, tok, prompts, limits, device) -> tuple[float, int]:
    """The reference's loop: one ``generate`` per prompt (sampling, top_k=0, top_p=1.0), then decode."""
    model = policy.model
    torch.manual_seed(SEED)
    tokens = 0
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        for ids, limit in zip(prompts, limits):
            x = torch.tensor([ids], device=device)
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=limit,
                                 min_new_tokens=limit, do_sample=True, top_k=0, top_p=1.0,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            tok.decode(out[0], skip_special_tokens=True)
            tokens += out.shape[1] - 1  # minus the decoder start token
    sync(device)
    return time.perf_counter() - t, tokens


@torch.no_grad()
def time_encoders(policy, prompts, device) -> tuple[float, float]:
    """The encoder pass alone: over the padded batch (what batched generate runs once) and prompt by prompt
    (what the loop runs). Both ways do this work in full; only the decoding can gain from batching."""
    from harness.ppo.step import pad_right

    encoder = policy.model.get_encoder()
    ids, mask = pad_right([torch.tensor(p) for p in prompts], 0)
    sync(device)
    t = time.perf_counter()
    encoder(input_ids=ids.to(device), attention_mask=mask.to(device))
    sync(device)
    batched = time.perf_counter() - t
    t = time.perf_counter()
    for p in prompts:
        x = torch.tensor([p], device=device)
        encoder(input_ids=x, attention_mask=torch.ones_like(x))
    sync(device)
    return batched, time.perf_counter() - t


def compare(name: str, policy, tok, prompts, limits, reps: int, device, log) -> dict:
    # warm-up: first calls pay for lazy initialisation
    run_batched(policy, tok, prompts[:2], [2, 2], device)
    run_one_at_a_time(policy, tok, prompts[:1], [2], device)
    batched, single, tok_b, tok_s = [], [], 0, 0
    for r in range(reps):
        order = ("batched", "single") if r % 2 == 0 else ("single", "batched")
        for which in order:
            if which == "batched":
                s, tok_b = run_batched(policy, tok, prompts, limits, device)
                batched.append(s)
            else:
                s, tok_s = run_one_at_a_time(policy, tok, prompts, limits, device)
                single.append(s)
            log(f"  {name} rep {r + 1}/{reps} {which}: {s:.2f} s")
    if tok_b != tok_s:
        raise RuntimeError(f"{name}: the two ways generated different numbers of tokens ({tok_b} vs {tok_s})")
    mb, ms = statistics.median(batched), statistics.median(single)
    enc = [time_encoders(policy, prompts, device) for _ in range(max(1, reps // 2))]
    eb, es = statistics.median(e[0] for e in enc), statistics.median(e[1] for e in enc)
    log(f"  {name} encoder alone: batched {eb:.2f} s, one at a time {es:.2f} s")
    return {"encoder_batched_median_s": eb, "encoder_one_at_a_time_median_s": es,
            "decode_speedup": (ms - es) / (mb - eb) if mb > eb else None,
            "world": name, "batch": len(prompts), "new_tokens_total": tok_b, "limits": list(limits),
            "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts), "reps": reps,
            "batched_s": batched, "one_at_a_time_s": single, "batched_median_s": mb, "one_at_a_time_median_s": ms,
            "speedup": ms / mb, "target": TARGETS[name], "meets_target": ms / mb >= TARGETS[name],
            "batched_tokens_per_s": tok_b / mb, "one_at_a_time_tokens_per_s": tok_s / ms}


# ------------------------------------------------------------------------------------ PPO step (child)

def ppo_step_child(reference: str, device: torch.device) -> dict:
    """One PPO step on the flan-t5-base architecture at batch 16; timings and peak memory of this process."""
    rss_start = rss_mb()
    tiny_cfg = concrete(load_config("tiny"))
    classifier = Classifier.load(tiny_cfg.reward.model, batch_size=BATCH, device=device)
    from transformers import AutoTokenizer

    from harness.tiny import resolve

    tok = SyntheticTokenizer(AutoTokenizer.from_pretrained(str(resolve("tiny://policy"))))
    dtype = resolve_dtype("auto", device)
    policy = build_flan_policy(device, dtype, reference, tok)
    cfg = load_config("flan-t5-base").ppo  # the reference's PPO settings (batch 16, mini-batch 4, lr 1.41e-5)
    assert cfg.batch_size == BATCH
    state = PPOState.create(policy, cfg)
    prompts = synthetic_prompts(BATCH)
    queries_text = tok.batch_decode(prompts)
    params = {id(q): q for m in (policy, policy.ref_model) if m is not None for q in m.parameters()}
    weight_mb = sum(q.numel() * q.element_size() for q in params.values()) / 2 ** 20
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_loaded = rss_mb()
    sync(device)

    t0 = time.perf_counter()
    roll = generate(policy.model, tok, prompts, max_new_tokens=FLAN_NEW_TOKENS, min_new_tokens=FLAN_NEW_TOKENS,
                    seeds=[SEED + i for i in range(BATCH)], top_k=0, top_p=1.0, device=device)
    sync(device)
    t1 = time.perf_counter()
    rewards, toxicity = classifier.score(reward_texts(queries_text, roll.texts, "query+response"), "logit")
    t2 = time.perf_counter()
    stats = ppo_step(policy, state, [torch.tensor(p) for p in prompts], roll.responses, rewards, cfg,
                     pad_token_id=0, decoder_start_token_id=0,
                     orders=random_orders(BATCH, torch.Generator().manual_seed(SEED)))
    sync(device)
    t3 = time.perf_counter()
    out = {"reference": reference, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
           "generate_s": t1 - t0, "score_s": t2 - t1, "update_s": t3 - t2, "total_s": t3 - t0,
           "update_forward_s": stats.get("time/ppo/forward_pass"),
           "update_optimize_s": stats.get("time/ppo/optimize_step"),
           "skipped": stats.get("skipped"), "objective_kl": stats.get("objective/kl"),
           "new_tokens_total": sum(roll.lengths), "weights_mib": weight_mb,
           "rss_start_mib": rss_start, "rss_loaded_mib": rss_loaded}
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        out["peak_kind"] = "torch.cuda.max_memory_allocated (torch allocations on the GPU)"
    else:
        out["peak_mib"] = peak_rss_mb()
        out["peak_kind"] = "RSS high-water mark of the process (resource.getrusage ru_maxrss)"
    return out


def ppo_step_in_child(reference: str, device: str, log) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", device, "--_ppo-child", reference]
    log(f"  PPO step, reference = {reference}: {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"PPO child ({reference}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ report

def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(results: dict) -> str:
    out = [f"device: {results['env']['device']} ({results['env']['torch_threads']} torch threads), "
           f"torch {results['env']['torch']}, batch {BATCH}", ""]
    rows = [["world", "new tokens", "batched (median s)", "one at a time (median s)", "speed-up", "target", "reps"]]
    for g in results["generation"]:
        rows.append([g["world"], str(g["new_tokens_total"]), f"{g['batched_median_s']:.3f}",
                     f"{g['one_at_a_time_median_s']:.3f}", f"{g['speedup']:.1f}x",
                     f">= {g['target']:.0f}x {'ok' if g['meets_target'] else 'MISSED'}", str(g["reps"])])
    out += ["Rollout of one PPO batch: batched generate vs the reference's one-prompt-at-a-time loop", table(rows), ""]
    rows = [["world", "encoder batched s", "encoder one at a time s", "decoding speed-up (total minus encoder)"]]
    for g in results["generation"]:
        d = g.get("decode_speedup")
        rows.append([g["world"], f"{g['encoder_batched_median_s']:.3f}", f"{g['encoder_one_at_a_time_median_s']:.3f}",
                     "n/a" if d is None else f"{d:.1f}x"])
    out += ["The encoder pass is the same work both ways (batching cannot shrink it on a CPU); the rest is decoding",
            table(rows), ""]
    if results.get("ppo_step"):
        rows = [["flan-t5-base PPO step", "generate s", "score s", "update s", "(fwd / optimize)", "total s",
                 "weights MiB", "peak MiB"]]
        for s in results["ppo_step"]:
            rows.append([f"reference = {s['reference']}", f"{s['generate_s']:.1f}", f"{s['score_s']:.2f}",
                         f"{s['update_s']:.1f}", f"{s['update_forward_s']:.1f} / {s['update_optimize_s']:.1f}",
                         f"{s['total_s']:.1f}", f"{s['weights_mib']:.0f}", f"{s['peak_mib']:.0f}"])
        out += [f"One PPO step, flan-t5-base architecture (random weights, {results['ppo_step'][0]['dtype']}), "
                f"batch {BATCH}, {FLAN_NEW_TOKENS} new tokens per row, scored by the tiny classifier",
                table(rows), f"peak memory: {results['ppo_step'][0]['peak_kind']}"]
        a = {s["reference"]: s for s in results["ppo_step"]}
        if {"adapter-off", "copy"} <= a.keys():
            out.append(f"separate frozen copy costs {a['copy']['peak_mib'] - a['adapter-off']['peak_mib']:+.0f} MiB "
                       f"peak ({a['copy']['weights_mib'] - a['adapter-off']['weights_mib']:+.0f} MiB of weights)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (about 6 minutes on a 2-core CPU)")
    ap.add_argument("--json", metavar="OUT", help="write every figure to this JSON file")
    ap.add_argument("--skip-ppo", action="store_true", help="only the generation comparison")
    ap.add_argument("--_ppo-child", dest="ppo_child", choices=["adapter-off", "copy"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = resolve_device(args.device)
    if args.ppo_child:
        print(json.dumps(ppo_step_child(args.ppo_child, device)))
        return 0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start = time.time()
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
               "env": {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
                       "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                       "cpu_count": os.cpu_count(), "python": platform.python_version(),
                       "machine": platform.machine()}, "generation": [], "ppo_step": []}
    quick = int(args.quick)

    log("tiny world: batched vs one at a time")
    _, policy, tok, prompts, limits = tiny_world(device)
    results["generation"].append(compare("tiny", policy, tok, prompts, limits, REPS["tiny"][quick], device, log))
    del policy

    log("flan-t5-base architecture: batched vs one at a time")
    from transformers import AutoTokenizer

    from harness.tiny import resolve

    flan_tok = SyntheticTokenizer(AutoTokenizer.from_pretrained(str(resolve("tiny://policy"))))
    flan = build_flan_policy(device, resolve_dtype("auto", device), "adapter-off", flan_tok)
    results["generation"].append(compare("flan-t5-base", flan, flan_tok, synthetic_prompts(BATCH),
                                         [FLAN_NEW_TOKENS] * BATCH, REPS["flan-t5-base"][quick], device, log))
    del flan

    if not args.skip_ppo:
        log("flan-t5-base architecture: one PPO step (child processes, for a clean peak-memory figure)")
        for reference in ("adapter-off", "copy"):
            results["ppo_step"].append(ppo_step_in_child(reference, args.device, log))
    results["seconds"] = time.time() - t_start
    print(report(results))
    print(f"\n(bench ran {results['seconds']:.0f} s: {results['command']})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

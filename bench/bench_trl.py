#!/usr/bin/env python
"""The harness's PPO step against TRL 0.11.4's, side by side in one run (issue 14).

Two long-lived child processes, each with the flan-t5-base architecture (random weights from the published
config: vocabulary 32,128), the reference's LoRA (r 32, alpha 32, q and v) and a value head:

- **harness**: this script in the project's environment: ``harness.ppo.rollout.generate`` (the decode loop,
  per-row seeded sampling, recording the policy's log-probs and values) then ``harness.ppo.step.ppo_step``;
- **TRL 0.11.4**: ``bench/trl_side.py`` in the parity venv (``tools/parity``: TRL 0.11.4, transformers
  4.46.3, peft 0.13.2, the same torch): ``PPOTrainer.generate(queries, batch_size=16)`` (TRL's batched
  generation) then ``PPOTrainer.step``.

Both: batch 16, the same 16 synthetic prompts of DialogSum-like length (150-250 token ids), the same fixed
scores, the reference's PPO settings (the ``flan-t5-base`` preset: mini-batch 4, one epoch, lr 1.41e-5,
adaptive KL), the adapter-disabled policy as the reference, the same dtype (float32 on the CPU,
bfloat16 on CUDA) and as many torch threads. Each phase is timed in wall-clock seconds and in the process's
CPU time (``time.process_time``, all threads): on a shared CPU the latter is far less disturbed by others'
load. New tokens: ``--lengths fixed`` (default) 64 per row
(min = max, so a random model cannot stop early); ``--lengths reference`` the reference's
LengthSampler(100, 400), one draw per row (the harness honours each row's limit inside the batch; TRL
batched can give a batch only one ``max_new_tokens``, so it generates the longest and each response is cut
to its row's limit before the update). Scoring is left out of both (fixed scores): a step here is
generation + update.

The children run one at a time, repetitions interleaved (the order alternates every repetition), after a
short warm-up step each. The report gives medians, the harness/TRL ratio of the step, the generation and the
update, and each process's peak memory (CPU: RSS high-water mark; CUDA: ``max_memory_allocated``, the
harness only, TRL's side reports RSS). The 2-core CPU is noisy: compare the ratios, not the seconds.

Usage::

    python tools/parity/make_golden.py --help     # once: builds .parity-venv (TRL 0.11.4) if missing
    python bench/bench_trl.py --reps 3 --json bench_trl.json
    python bench/bench_trl.py --lengths reference --reps 1   # 100-400 new tokens: slow on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for p in (ROOT, HERE):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

PARITY_VENV = ROOT / ".parity-venv"
TOKENIZER = ROOT / "fixtures" / "parity" / "model"  # pad 0, eos 1: TRL only pads with it
BATCH = 16
FIXED_NEW_TOKENS = 64
REFERENCE_LENGTHS = (100, 400)
WARMUP_NEW_TOKENS = 4
SEED = 1234
TARGET_CPU = 0.6  # the target: a harness step at most 0.6x TRL batched's on the CPU
TARGET_CUDA = 1 / 3


def setup(args) -> dict:
    from bench_rollout import FLAN_T5_BASE, synthetic_prompts

    from harness.config import load_config

    preset = load_config("flan-t5-base")
    ppo, pol = preset.ppo, preset.policy
    rng = random.Random(SEED)
    if args.lengths == "fixed":
        new_tokens = [FIXED_NEW_TOKENS] * BATCH
    else:
        from harness.ppo.rollout import LengthSampler

        new_tokens = LengthSampler(*REFERENCE_LENGTHS, seed=SEED).sample(BATCH)
    return {
        "seed": SEED, "architecture": FLAN_T5_BASE, "prompts": synthetic_prompts(BATCH),
        "scores": [round(rng.uniform(-2.0, 2.0), 4) for _ in range(BATCH)], "new_tokens": new_tokens,
        "lora_r": pol.lora_r, "lora_alpha": pol.lora_alpha, "lora_targets": list(pol.lora_target_modules),
        "ppo": {"batch_size": ppo.batch_size, "mini_batch_size": ppo.mini_batch_size,
                "gradient_accumulation_steps": ppo.gradient_accumulation_steps, "ppo_epochs": ppo.ppo_epochs,
                "learning_rate": ppo.learning_rate, "adap_kl_ctrl": ppo.adap_kl_ctrl,
                "init_kl_coef": ppo.init_kl_coef, "target": ppo.target, "horizon": ppo.horizon,
                "gamma": ppo.gamma, "lam": ppo.lam, "cliprange": ppo.cliprange,
                "cliprange_value": ppo.cliprange_value, "vf_coef": ppo.vf_coef, "kl_penalty": ppo.kl_penalty},
        "device": args.device, "reuse_rollout_outputs": not args.recompute_old,
    }


# ------------------------------------------------------------------------------------ harness child

def harness_child(setup_path: str) -> int:
    """The harness's side: build once, then answer step/stats commands (one JSON line each)."""
    import torch
    from bench_rollout import SyntheticTokenizer, build_flan_policy

    from harness.config import PPOConfig
    from harness.models import resolve_device, resolve_dtype
    from harness.ppo.batch import Record
    from harness.ppo.core import SampledDistribution
    from harness.ppo.rollout import generate
    from harness.ppo.step import PPOState, ppo_step, random_orders

    s = json.loads(Path(setup_path).read_text())
    device = resolve_device(s["device"])

    class Tok(SyntheticTokenizer):  # texts are not scored here: skip the decoding
        def __init__(self):
            pass

        def batch_decode(self, batch, skip_special_tokens: bool = True):
            return [""] * len(batch)

    tok = Tok()
    policy = build_flan_policy(device, resolve_dtype("auto", device), "adapter-off", tok)
    cfg = PPOConfig(**s["ppo"])
    state = PPOState.create(policy, cfg, pad_token_id=0, decoder_start_token_id=0)
    queries = [torch.tensor(p) for p in s["prompts"]]
    scores = torch.tensor(s["scores"])
    record = Record(policy.value_head, SampledDistribution()) if s["reuse_rollout_outputs"] else None
    print(json.dumps({"ready": True, "torch_threads": torch.get_num_threads()}), flush=True)
    step = 0
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "stats":
            out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
            if device.type == "cuda":
                out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
            print(json.dumps(out), flush=True)
            continue
        limits = cmd["new_tokens"]
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        roll = generate(policy.model, tok, s["prompts"], max_new_tokens=limits, min_new_tokens=max(limits),
                        seeds=[SEED + 1000 * step + i for i in range(BATCH)], top_k=0, top_p=1.0, device=device,
                        record=record)
        _sync(device)
        t1, c1 = time.perf_counter(), time.process_time()
        stats = ppo_step(policy, state, queries, roll.responses, scores, recorded=roll.recorded,
                         orders=random_orders(BATCH, torch.Generator().manual_seed(SEED + step)))
        _sync(device)
        t2, c2 = time.perf_counter(), time.process_time()
        step += 1
        print(json.dumps({"generate_s": t1 - t0, "update_s": t2 - t1, "step_s": t2 - t0,
                          "generate_cpu_s": c1 - c0, "update_cpu_s": c2 - c1, "step_cpu_s": c2 - c0,
                          "update_forward_s": stats.get("time/ppo/forward_pass"),
                          "update_optimize_s": stats.get("time/ppo/optimize_step"),
                          "new_tokens_total": sum(roll.lengths), "skipped": stats.get("skipped")}), flush=True)
    return 0


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------ parent

class Child:
    def __init__(self, name: str, cmd: list[str], log, threads: int | None = None):
        self.name, self.log = name, log
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        if threads:  # both sides alike; torch reads these at start
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.hello = self._read()

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                err = self.proc.stderr.read()
                raise RuntimeError(f"{self.name} child died:\n{err[-4000:]}")
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--lengths", default="fixed", choices=["fixed", "reference"],
                    help="fixed: 64 new tokens per row; reference: LengthSampler(100, 400) per row (slow on a CPU)")
    ap.add_argument("--reps", type=int, default=3, help="timed steps per side, interleaved")
    ap.add_argument("--json", metavar="OUT", help="write every figure to this JSON file")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in each child (default: torch's). 1 on a shared CPU: no thread waits on "
                         "another that lost its core, and CPU time then measures the work")
    ap.add_argument("--no-warmup", action="store_true",
                    help="no warm-up step (on a CPU a step takes minutes: lazy initialisation is lost in it)")
    ap.add_argument("--recompute-old", action="store_true",
                    help="the harness recomputes the policy's log-probs and values by a forward (no reuse)")
    ap.add_argument("--trl-python", default=str(PARITY_VENV / "bin" / "python"),
                    help="the parity venv's python (TRL 0.11.4)")
    ap.add_argument("--_child", dest="child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return harness_child(args.child)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if not Path(args.trl_python).exists():
        log(f"no TRL environment at {args.trl_python}: run `python tools/parity/make_golden.py` once to build it")
        return 2
    t_start = time.time()
    conf = setup(args)
    with tempfile.TemporaryDirectory() as tmp:
        setup_path = Path(tmp) / "setup.json"
        setup_path.write_text(json.dumps(conf))
        log("starting the two children (each builds its model once)")
        children = {
            "harness": Child("harness", [sys.executable, str(Path(__file__).resolve()), "--_child", str(setup_path)],
                             log, args.threads),
            "trl": Child("trl", [args.trl_python, str(HERE / "trl_side.py"), "--setup", str(setup_path),
                                 "--tokenizer", str(TOKENIZER)], log, args.threads),
        }
        try:
            for name, child in children.items():
                if args.no_warmup:
                    break
                log(f"  {name} warm-up ({WARMUP_NEW_TOKENS} new tokens): "
                    f"{child.ask(cmd='step', new_tokens=[WARMUP_NEW_TOKENS] * BATCH)['step_s']:.1f} s")
            runs = {name: [] for name in children}
            for r in range(args.reps):
                order = ["harness", "trl"] if r % 2 == 0 else ["trl", "harness"]
                for name in order:
                    out = children[name].ask(cmd="step", new_tokens=conf["new_tokens"])
                    runs[name].append(out)
                    log(f"  rep {r + 1}/{args.reps} {name}: step {out['step_s']:.1f} s (generate "
                        f"{out['generate_s']:.1f}, update {out['update_s']:.1f}; CPU time {out['step_cpu_s']:.1f} s)")
                    if args.json:  # what has been measured so far, should the run be cut short
                        Path(args.json).write_text(json.dumps({"partial": True, "setup": conf, "runs": runs}))
            memory = {name: child.ask(cmd="stats") for name, child in children.items()}
            hello = {name: child.hello for name, child in children.items()}
        finally:
            for child in children.values():
                child.close()

    results = summarise(args, conf, runs, memory, hello, time.time() - t_start)
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def summarise(args, conf, runs, memory, hello, seconds) -> dict:
    import torch

    keys = ("step_s", "generate_s", "update_s", "step_cpu_s", "generate_cpu_s", "update_cpu_s")
    med = {name: {k: median([r[k] for r in rs]) for k in keys} for name, rs in runs.items()}
    ratios = {k: med["harness"][k] / med["trl"][k] for k in keys}
    target = TARGET_CPU if args.device == "cpu" else TARGET_CUDA
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "seconds": seconds,
        "env": {"device": args.device, "torch": torch.__version__, "cpu_count": os.cpu_count(),
                "python": platform.python_version(), "children": hello},
        "setup": {"batch": BATCH, "lengths": args.lengths, "new_tokens": conf["new_tokens"],
                  "prompt_tokens_mean": sum(map(len, conf["prompts"])) / BATCH, "ppo": conf["ppo"],
                  "dtype": "float32" if args.device == "cpu" else "bfloat16",
                  "harness_reuses_rollout_outputs": conf["reuse_rollout_outputs"]},
        "reps": args.reps, "runs": runs, "medians": med, "ratios_harness_over_trl": ratios,
        "peak_memory": memory, "step_target": target, "meets_step_target": ratios["step_s"] <= target,
    }


def report(res: dict) -> str:
    med, ratios, mem = res["medians"], res["ratios_harness_over_trl"], res["peak_memory"]
    rows = [["", "step s", "generation s", "update s", "peak RSS MiB"]]
    for name, label in (("trl", "TRL 0.11.4 (batched generate)"), ("harness", "detox-harness")):
        rows.append([label, f"{med[name]['step_s']:.2f}", f"{med[name]['generate_s']:.2f}",
                     f"{med[name]['update_s']:.2f}", f"{mem[name]['peak_rss_mib']:.0f}"])
    rows.append(["harness / TRL", f"{ratios['step_s']:.2f}", f"{ratios['generate_s']:.2f}",
                 f"{ratios['update_s']:.2f}",
                 f"{mem['harness']['peak_rss_mib'] / mem['trl']['peak_rss_mib']:.2f}"])
    rows.append(["harness / TRL, CPU time", f"{ratios['step_cpu_s']:.2f}", f"{ratios['generate_cpu_s']:.2f}",
                 f"{ratios['update_cpu_s']:.2f}", ""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    s = res["setup"]
    head = (f"PPO step, flan-t5-base architecture (random weights, vocabulary 32128), {s['dtype']} on "
            f"{res['env']['device']}, batch {s['batch']}, new tokens: "
            f"{'64 per row' if s['lengths'] == 'fixed' else 'LengthSampler(100, 400) per row'}, "
            f"medians of {res['reps']} interleaved repetitions")
    verdict = (f"step ratio {ratios['step_s']:.2f} (wall clock; {ratios['step_cpu_s']:.2f} in process CPU time, "
               f"which other load on the machine disturbs less) vs target <= {res['step_target']:.2f}: "
               f"{'met' if res['meets_step_target'] else 'MISSED'}")
    if "cuda_peak_mib" in mem["harness"]:
        verdict += f"\nharness CUDA peak (max_memory_allocated): {mem['harness']['cuda_peak_mib']:.0f} MiB"
    return "\n".join([head, *lines, verdict, f"(bench ran {res['seconds']:.0f} s: {res['command']})"])


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""TRL 0.11.4's side of ``bench/bench_trl.py``: a long-lived child that runs in the parity venv.

Never imports the harness (the parity venv has transformers 4.46.3). It builds the flan-t5-base architecture
with random weights, the reference's LoRA (r 32, alpha 32, q and v; dropout 0 as the harness) and TRL's
value head, wraps them in TRL 0.11.4's ``PPOTrainer`` (``ref_model=None``: the reference is the policy with
the adapter disabled, as the harness's), then answers commands, one JSON object per line on stdin:

- ``{"cmd": "step", "new_tokens": [...]}``: one PPO step on the fixed batch: TRL's batched ``generate``
  (``ppo_trainer.generate(queries, batch_size=16)``, sampling with ``top_k=0, top_p=1.0``), responses cut to
  each row's limit, then ``ppo_trainer.step`` with the fixed scores. TRL batched can only give one
  ``max_new_tokens`` to a batch: it generates ``max(new_tokens)`` tokens (min = max, so a random model does
  not stop early) and each response is then cut to its row's limit, so the update sees the same lengths as
  the harness's.
- ``{"cmd": "stats"}``: the process's peak RSS.

Each answer is one JSON line on stdout; the setup is given as a JSON file (``--setup``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--setup", required=True)
    ap.add_argument("--tokenizer", required=True, help="a T5 tokenizer directory with pad 0 and eos 1 (padding only)")
    args = ap.parse_args()
    setup = json.loads(open(args.setup).read())
    warnings.filterwarnings("ignore")
    import torch
    import transformers
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration
    from trl import AutoModelForSeq2SeqLMWithValueHead, PPOConfig, PPOTrainer

    transformers.logging.set_verbosity_error()
    torch.manual_seed(setup["seed"])
    base = T5ForConditionalGeneration(T5Config(**setup["architecture"])).eval()
    lora = LoraConfig(r=setup["lora_r"], lora_alpha=setup["lora_alpha"], target_modules=setup["lora_targets"],
                      lora_dropout=0.0, bias="none", task_type=TaskType.SEQ_2_SEQ_LM)
    model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(get_peft_model(base, lora), is_trainable=True)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    cfg = PPOConfig(exp_name="bench", seed=setup["seed"], log_with=None, **setup["ppo"])
    trainer = PPOTrainer(config=cfg, model=model, ref_model=None, tokenizer=tok)
    queries = [torch.tensor(q, dtype=torch.long) for q in setup["prompts"]]
    scores = [torch.tensor(s, dtype=torch.float32) for s in setup["scores"]]
    print(json.dumps({"ready": True, "torch_threads": torch.get_num_threads(), "trl": __import__("trl").__version__,
                      "transformers": transformers.__version__}), flush=True)

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "stats":
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(json.dumps({"peak_rss_mib": peak}), flush=True)
            continue
        limits = cmd["new_tokens"]
        longest = max(limits)
        gen_kwargs = {"min_new_tokens": longest, "max_new_tokens": longest, "top_k": 0, "top_p": 1.0,
                      "do_sample": True, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
        t0, c0 = time.perf_counter(), time.process_time()
        responses = trainer.generate(queries, batch_size=len(queries), return_prompt=False, **gen_kwargs)
        # TRL's encoder-decoder responses start with the decoder start token: keep it, cut at each row's limit
        responses = [r[: 1 + n] for r, n in zip(responses, limits)]
        t1, c1 = time.perf_counter(), time.process_time()
        stats = trainer.step(queries, responses, scores)
        t2, c2 = time.perf_counter(), time.process_time()
        print(json.dumps({"generate_s": t1 - t0, "update_s": t2 - t1, "step_s": t2 - t0,
                          "generate_cpu_s": c1 - c0, "update_cpu_s": c2 - c1, "step_cpu_s": c2 - c0,
                          "update_forward_s": float(stats.get("time/ppo/forward_pass", float("nan"))),
                          "update_optimize_s": float(stats.get("time/ppo/optimize_step", float("nan"))),
                          "new_tokens_total": sum(len(r) - 1 for r in responses)}), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())

#!/usr/bin/env python3
"""Golden files that pin the harness's PPO step to TRL 0.11.4's ``PPOTrainer.step``, number for number.

TRL 0.11.4 is the last TRL whose PPOTrainer handles encoder-decoder models; the harness has its own PPO
(``harness/ppo``) and ``suites/unit/test_parity.py`` proves it against the files this script writes.

The script never runs in the project's environment: it creates (once) an isolated virtual environment
at ``<repo>/.parity-venv`` with the pins of ``tools/parity/requirements.txt`` and re-executes itself
there. Inside it:

1. if ``fixtures/parity`` lacks them (or with ``--rebuild-fixtures``), it writes, deterministically from
   a fixed seed, a tiny T5 (``model/``), a LoRA adapter with nonzero B matrices (``adapter/``), a value
   head (``value_head.safetensors``) and a fixed batch of 8 queries, responses and scores (``batch.json``);
2. for every case of :data:`CASES` it loads those fixtures, runs ``PPOTrainer.step`` twice on the batch
   (ref_model=None: the reference is the adapter-disabled policy), records every scalar statistic that
   TRL returns and every permutation that ``np.random.permutation`` hands to TRL's mini-batch loop, and
   writes ``golden/<case>.json`` and ``golden/<case>.safetensors`` (the trainable weights after step 2);
3. it writes ``golden/forward.safetensors``: TRL's own ``batched_forward_pass`` of the fixture policy and
   reference on the batch (padded inputs, logits, log-probs, values, masks), so a test can tell a model
   forward that differs (transformers 5 vs 4.46.3) from a PPO step that differs.

``--check`` regenerates everything into a temporary directory and compares it byte for byte with the
committed files; it exits 1 on any difference. ``--probe float64`` reruns the cases in float64 and prints
how far each golden number moves: a measure of how well-conditioned the goldens are for a 1e-5 tolerance.

Usage (from anywhere; any Python >= 3.10 can start it)::

    python tools/parity/make_golden.py            # fixtures if missing, then goldens
    python tools/parity/make_golden.py --check    # regenerate into a temp dir, compare byte for byte
    python tools/parity/make_golden.py --probe float64
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FIXTURES = REPO / "fixtures" / "parity"
VENV = REPO / ".parity-venv"
REQUIREMENTS = HERE / "requirements.txt"
STAMP = VENV / ".parity-requirements.sha256"
ENV_FLAG = "DETOX_PARITY_IN_VENV"

SEED = 20240611  # every random draw of the fixtures derives from this
TRL_SEED = 7  # PPOConfig.seed: PPOTrainer calls set_seed(seed), which seeds np.random.permutation

# ---- the tiny world -------------------------------------------------------------------------------
VOCAB = 96
PAD, EOS, UNK = 0, 1, 2
T5_KWARGS = dict(
    vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
    relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
    feed_forward_proj="gated-gelu",  # FLAN-T5's feed-forward
    tie_word_embeddings=False,  # as FLAN-T5: no d_model**-0.5 rescaling of the decoder output
    decoder_start_token_id=0, pad_token_id=PAD, eos_token_id=EOS, initializer_factor=1.0,
)
LORA_KWARGS = dict(r=4, lora_alpha=8, target_modules=["q", "v"], lora_dropout=0.0, bias="none")
LORA_B_STD = 0.05  # nonzero B: the policy differs from the reference (KL ~ 0.1-5 nats per sequence)
VALUE_HEAD_STD = 1.0

QUERY_LENGTHS = [5, 12, 7, 9, 6, 11, 8, 10]  # tokens, the last one eos
RESPONSE_LENGTHS = [3, 10, 5, 7, 4, 9, 6, 8]  # tokens including the leading decoder-start 0
TRUNCATED = {3, 6}  # these responses do not end with eos (generation hit max_new_tokens)
SCORES = [1.3125, -0.6875, 2.21875, -1.53125, 0.40625, -0.15625, 0.84375, -1.09375]

# ---- the PPO cases --------------------------------------------------------------------------------
N_STEPS = 2  # PPOTrainer.step calls per case, on the same batch
COMMON = dict(
    batch_size=8, mini_batch_size=4, gradient_accumulation_steps=1, ppo_epochs=2, learning_rate=1e-3,
    init_kl_coef=0.2, target=6.0, horizon=10000.0, gamma=1.0, lam=0.95, cliprange=0.2,
    cliprange_value=0.2, vf_coef=0.1, whiten_rewards=False, max_grad_norm=None, early_stopping=False,
    target_kl=1.0, ratio_threshold=10.0, use_score_scaling=False, use_score_norm=False, score_clip=None,
)
CASES = {
    "kl_adaptive": dict(kl_penalty="kl", adap_kl_ctrl=True),
    "full_fixed": dict(kl_penalty="full", adap_kl_ctrl=False),
    "abs_fixed": dict(kl_penalty="abs", adap_kl_ctrl=False),
    # a short horizon and a target near the batch's KL: the controller's unclipped branch, visibly
    "mse_adaptive": dict(kl_penalty="mse", adap_kl_ctrl=True, init_kl_coef=0.3, target=4.5, horizon=200.0),
    # the trl_compat paths: one mini-batch (mean ratio 1.12) passes ratio_threshold: TRL zeroes its loss
    # but still steps Adam (momentum moves the weights)
    "ratio_skip_fixed": dict(kl_penalty="kl", adap_kl_ctrl=False, ratio_threshold=1.05),
    # step 1 runs both epochs (its epoch-1 policykl is below 1.5 x 0.01), step 2 stops after epoch 1
    "early_stop_fixed": dict(kl_penalty="kl", adap_kl_ctrl=False, early_stopping=True, target_kl=0.01),
    "whiten_fixed": dict(kl_penalty="kl", adap_kl_ctrl=False, whiten_rewards=True),
    # TRL clips only the first mini-batch of the trainer's life: self.model_params is a one-shot filter()
    "gradclip_fixed": dict(kl_penalty="kl", adap_kl_ctrl=False, max_grad_norm=1.0),
}
CONFIG_FIELDS = [
    "batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs", "learning_rate",
    "kl_penalty", "adap_kl_ctrl", "init_kl_coef", "target", "horizon", "gamma", "lam", "cliprange",
    "cliprange_value", "vf_coef", "whiten_rewards", "max_grad_norm", "early_stopping", "target_kl",
    "ratio_threshold", "use_score_scaling", "use_score_norm", "score_clip", "seed",
]


# ====================================================================================================
# the isolated environment

def _requirements_hash() -> str:
    return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()


def _venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _in_parity_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def ensure_venv_and_reexec() -> None:
    """Create/refresh .parity-venv when needed and re-execute this script inside it (never returns)."""
    py = _venv_python()
    if not py.exists():
        base = getattr(sys, "_base_executable", None) or sys.executable
        print(f"[parity] creating {VENV} with {base}", flush=True)
        subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    want = _requirements_hash()
    if not STAMP.exists() or STAMP.read_text().strip() != want:
        print(f"[parity] installing {REQUIREMENTS.relative_to(REPO)} into {VENV.name} (once)", flush=True)
        # one pip command with torch pinned beside everything else: pip never picks a CUDA build
        subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-r", str(REQUIREMENTS)],
                       check=True)
        STAMP.write_text(want + "\n")
    env = dict(os.environ, **{ENV_FLAG: "1"})
    # one thread everywhere: the goldens must be bit-exact from run to run
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONHASHSEED="0", CUBLAS_WORKSPACE_CONFIG=":4096:8", CUDA_VISIBLE_DEVICES="",
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1", HF_HUB_OFFLINE="1", WANDB_DISABLED="true")
    os.execve(str(py), [str(py), str(Path(__file__).resolve()), *sys.argv[1:]], env)  # noqa: S606 - own venv


# ====================================================================================================
# everything below runs inside .parity-venv

def _setup_determinism() -> None:
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel work; OMP_NUM_THREADS=1 is set anyway
        pass
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)
    import warnings

    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()


def make_tokenizer():
    """A word-level tokenizer over the tiny vocabulary: TRL only uses it to pad (pad 0, right side)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "</s>": EOS, "<unk>": UNK}
    vocab.update({f"w{i}": i for i in range(3, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=64, padding_side="right")


def make_batch(policy) -> dict:
    """Random queries; responses sampled from the fixture policy (so the sampled-token KL estimate is a
    KL estimate), one token at a time with a seeded generator, eos suppressed inside the body; the
    responses that are not truncated get eos as their last token."""
    import torch

    rng = random.Random(SEED)
    queries = [[rng.randrange(3, VOCAB) for _ in range(n - 1)] + [EOS] for n in QUERY_LENGTHS]
    gen = torch.Generator().manual_seed(SEED + 4)
    responses = []
    with torch.no_grad():
        for i, (q, n) in enumerate(zip(queries, RESPONSE_LENGTHS)):
            ids = [0]
            n_sampled = n - 1 if i in TRUNCATED else n - 2
            for _ in range(n_sampled):
                logits = policy(input_ids=torch.tensor([q]), decoder_input_ids=torch.tensor([ids])).logits[0, -1]
                logits[[PAD, EOS, UNK]] = float("-inf")
                ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)))
            if i not in TRUNCATED:
                ids.append(EOS)
            responses.append(ids)
    return {
        "description": "TRL's format. queries: random tokens ending with eos (1), no padding. responses: the "
                       "decoder-start token 0, then tokens sampled from the fixture policy (adapter on), then eos, "
                       "except responses " + " and ".join(map(str, sorted(TRUNCATED))) + " (0-based), which are "
                       "truncated (no eos). scores: fixed. Harness responses are these without the leading 0.",
        "pad_token_id": PAD, "eos_token_id": EOS, "decoder_start_token_id": 0,
        "queries": queries, "responses": responses, "scores": SCORES,
    }


def build_fixtures(out: Path) -> None:
    """Write model/, adapter/, value_head.safetensors and batch.json into out (deterministic)."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from safetensors.torch import save_file
    from transformers import T5Config, T5ForConditionalGeneration

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    config = T5Config(**T5_KWARGS)
    base = T5ForConditionalGeneration(config).to(torch.float32).eval()
    base.save_pretrained(out / "model", safe_serialization=True)
    make_tokenizer().save_pretrained(out / "model")  # for code that loads a tokenizer beside the model

    torch.manual_seed(SEED + 1)
    lora = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, init_lora_weights=True, **LORA_KWARGS)
    peft_model = get_peft_model(base, lora)
    gen = torch.Generator().manual_seed(SEED + 2)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * LORA_B_STD)
    peft_model.peft_config["default"].base_model_name_or_path = None  # no machine path in the fixture
    peft_model.save_pretrained(out / "adapter", safe_serialization=True)
    readme = out / "adapter" / "README.md"  # peft's model-card template: noise, not a fixture
    if readme.exists():
        readme.unlink()

    gen = torch.Generator().manual_seed(SEED + 3)
    weight = torch.randn((1, config.d_model), generator=gen) * VALUE_HEAD_STD
    bias = torch.randn((1,), generator=gen) * VALUE_HEAD_STD
    save_file({"summary.weight": weight.contiguous(), "summary.bias": bias.contiguous()},
              str(out / "value_head.safetensors"))

    (out / "batch.json").write_text(dump_json(make_batch(peft_model.eval())))


def load_trl_policy(fx: Path, dtype=None):
    """Fixture base model + trainable adapter + fixture value head, as TRL wraps them."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSeq2SeqLM
    from trl import AutoModelForSeq2SeqLMWithValueHead

    dtype = dtype or torch.float32
    base = AutoModelForSeq2SeqLM.from_pretrained(str(fx / "model"), torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(fx / "adapter"), is_trainable=True)
    model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(peft_model, summary_dropout_prob=0.0)
    assert model.is_peft_model and isinstance(model.v_head.dropout, torch.nn.Identity)
    vh = load_file(str(fx / "value_head.safetensors"))
    model.v_head.summary.load_state_dict({"weight": vh["summary.weight"], "bias": vh["summary.bias"]})
    return model.to(dtype)


def trainable_weights(model) -> dict:
    from peft import get_peft_model_state_dict

    out = {f"adapter.{k}": v.detach().clone().contiguous()
           for k, v in get_peft_model_state_dict(model.pretrained_model).items()}
    out["value_head.summary.weight"] = model.v_head.summary.weight.detach().clone().contiguous()
    out["value_head.summary.bias"] = model.v_head.summary.bias.detach().clone().contiguous()
    return out


def dump_json(obj) -> str:
    """Sorted, indented JSON with lists of integers on one line; floats as Python's shortest repr."""
    text = json.dumps(obj, indent=1, sort_keys=True, allow_nan=False)
    text = re.sub(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]", lambda m: "[" + re.sub(r",\s*", ", ", m.group(1)) + "]", text)
    return text + "\n"


def _scalar_stats(stats: dict) -> dict:
    import numpy as np
    import torch

    out = {}
    for k, v in stats.items():
        if k.startswith("time/"):  # wall-clock timings: not reproducible, not compared
            continue
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().numpy()
        if isinstance(v, (np.ndarray, np.generic)):
            if v.size != 1:
                continue  # distributions (objective/logprobs, ppo/policy/ratio, ...) are not golden numbers
            v = v.reshape(()).item()
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[k] = float(v)
    return dict(sorted(out.items()))


class _RecordPermutations:
    """Wrap np.random.permutation while TRL steps: keep every permutation it returns, in order."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.permutations: list[list[int]] = []

    def __enter__(self):
        import numpy as np

        self._np = np
        self._orig = np.random.permutation

        def permutation(x, *args, **kwargs):
            result = self._orig(x, *args, **kwargs)
            self.permutations.append([int(i) for i in result])
            return result

        np.random.permutation = permutation
        return self

    def __exit__(self, *exc):
        self._np.random.permutation = self._orig
        return False


def _tensors(batch: dict):
    import torch

    queries = [torch.tensor(q, dtype=torch.long) for q in batch["queries"]]
    responses = [torch.tensor(r, dtype=torch.long) for r in batch["responses"]]
    scores = [torch.tensor(s, dtype=torch.float32) for s in batch["scores"]]
    return queries, responses, scores


def _make_trainer(fx: Path, case: str, dtype=None):
    from trl import PPOConfig, PPOTrainer

    params = dict(COMMON, **CASES[case])
    cfg = PPOConfig(exp_name="parity", seed=TRL_SEED, log_with=None, **params)
    model = load_trl_policy(fx, dtype)
    trainer = PPOTrainer(config=cfg, model=model, ref_model=None, tokenizer=make_tokenizer())
    assert trainer.is_encoder_decoder and trainer.is_peft_model and trainer.ref_model is None
    return cfg, model, trainer


def run_case(fx: Path, case: str, dtype=None) -> tuple[dict, dict, list]:
    """TRL's PPOTrainer.step, N_STEPS times on the fixture batch. Returns (golden json, weights, margins)."""
    batch = json.loads((fx / "batch.json").read_text())
    cfg, model, trainer = _make_trainer(fx, case, dtype)
    queries, responses, scores = _tensors(batch)

    margins = []  # per mini-batch: how far it is from flipping a discrete decision (diagnostics only)
    orig_loss = trainer.loss

    def loss(old_logprobs, values, logits, vpreds, logprobs, mask, advantages, returns):
        import torch

        with torch.no_grad():
            m = mask.bool()
            ratio = torch.exp(logprobs - old_logprobs)[m]
            margins.append({
                "ratio_clip": float((ratio - 1).abs().sub(cfg.cliprange).abs().min()),
                "value_clip": float((vpreds - values)[m].abs().sub(cfg.cliprange_value).abs().min()),
                "ratio_threshold": abs(float(ratio.mean()) - cfg.ratio_threshold),
                "early_stop": abs(float((old_logprobs - logprobs)[m].mean()) - 1.5 * cfg.target_kl),
            })
        return orig_loss(old_logprobs, values, logits, vpreds, logprobs, mask, advantages, returns)

    trainer.loss = loss
    steps = []
    with _RecordPermutations(cfg.batch_size) as rec:
        for _ in range(N_STEPS):
            stats = trainer.step(queries, responses, scores)
            steps.append(_scalar_stats(stats))
    # one permutation per epoch run (early stopping ends a step's epochs early)
    assert N_STEPS <= len(rec.permutations) <= N_STEPS * cfg.ppo_epochs, rec.permutations
    golden = {
        "trl_version": __import__("trl").__version__,
        "config": {k: getattr(cfg, k) for k in CONFIG_FIELDS},
        "steps": steps,
        "permutations": rec.permutations,
    }
    return golden, trainable_weights(model), margins


def forward_reference(fx: Path) -> dict:
    """TRL's batched_forward_pass on the fixture batch, policy and reference, before any update."""
    import torch

    batch = json.loads((fx / "batch.json").read_text())
    _, _, trainer = _make_trainer(fx, "full_fixed")
    queries, responses, _ = _tensors(batch)
    inputs = trainer.prepare_model_inputs(queries, responses)
    with torch.no_grad():
        logprobs, logits, values, masks = trainer.batched_forward_pass(
            trainer.model, queries, responses, inputs, return_logits=True)
        with trainer.optional_peft_ctx():
            ref_logprobs, ref_logits, _, _ = trainer.batched_forward_pass(
                trainer.model, queries, responses, inputs, return_logits=True)
    out = {k: v.contiguous() for k, v in inputs.items()}
    out.update(logprobs=logprobs, logits=logits, values=values, masks=masks.to(torch.long),
               ref_logprobs=ref_logprobs, ref_logits=ref_logits)
    return {k: v.detach().contiguous() for k, v in out.items()}


def write_goldens(fx: Path, golden_dir: Path, verbose: bool = True) -> None:
    from safetensors.torch import save_file

    golden_dir.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        golden, weights, margins = run_case(fx, case)
        (golden_dir / f"{case}.json").write_text(dump_json(golden))
        save_file(weights, str(golden_dir / f"{case}.safetensors"))
        if verbose:
            s = golden["steps"]
            closest = {k: min(m[k] for m in margins) for k in margins[0]}
            per_epoch = golden["config"]["batch_size"] // golden["config"]["mini_batch_size"]
            # TRL's early stopping looks at the last mini-batch of each epoch only
            closest["early_stop"] = min(m["early_stop"] for m in margins[per_epoch - 1::per_epoch])
            print(f"[parity] {case}: objective/kl {s[0]['objective/kl']:.4f} -> {s[1]['objective/kl']:.4f}, "
                  f"kl_coef {s[0]['objective/kl_coef']:.6g} -> {s[1]['objective/kl_coef']:.6g}, "
                  f"policy/clipfrac {s[0]['ppo/policy/clipfrac']:.3f}/{s[1]['ppo/policy/clipfrac']:.3f}, "
                  f"val/clipfrac {s[0]['ppo/val/clipfrac']:.3f}/{s[1]['ppo/val/clipfrac']:.3f}, "
                  f"{len(golden['permutations'])} permutations; closest decisions: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in closest.items()), flush=True)
    save_file(forward_reference(fx), str(golden_dir / "forward.safetensors"))


# ---- comparison ------------------------------------------------------------------------------------

def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def compare_trees(expected: Path, actual: Path, label: str) -> list[str]:
    problems = []
    want, got = _files(expected), _files(actual)
    for name in sorted(want - got):
        problems.append(f"{label}: {name} is committed but was not regenerated")
    for name in sorted(got - want):
        problems.append(f"{label}: {name} was regenerated but is not committed")
    for name in sorted(want & got):
        if not filecmp.cmp(expected / name, actual / name, shallow=False):
            problems.append(f"{label}: {name} differs")
    return problems


def check() -> int:
    if not (FIXTURES / "golden").is_dir():
        print(f"[parity] no goldens under {FIXTURES}: run without --check first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="parity-check-") as tmp:
        tmp = Path(tmp)
        build_fixtures(tmp / "fixtures")
        problems = []
        for name in ("model", "adapter"):
            problems += compare_trees(FIXTURES / name, tmp / "fixtures" / name, "fixtures")
        for name in ("value_head.safetensors", "batch.json"):
            if not filecmp.cmp(FIXTURES / name, tmp / "fixtures" / name, shallow=False):
                problems.append(f"fixtures: {name} differs")
        # goldens are computed from the committed fixtures, as the test reads them
        write_goldens(FIXTURES, tmp / "golden", verbose=False)
        problems += compare_trees(FIXTURES / "golden", tmp / "golden", "golden")
    if problems:
        print("[parity] CHECK FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    n = len(_files(FIXTURES))
    print(f"[parity] check passed: {n} files under {FIXTURES.relative_to(REPO)} regenerate byte for byte")
    return 0


def probe(dtype_name: str) -> int:
    """Rerun the cases in another dtype; print how far every golden number moves (conditioning)."""
    import torch
    from safetensors.torch import load_file

    dtype = getattr(torch, dtype_name)
    torch.set_default_dtype(dtype)
    for case in CASES:
        golden = json.loads((FIXTURES / "golden" / f"{case}.json").read_text())
        weights = load_file(str(FIXTURES / "golden" / f"{case}.safetensors"))
        got, got_w, _ = run_case(FIXTURES, case, dtype)
        worst = []
        for i, (a, b) in enumerate(zip(golden["steps"], got["steps"])):
            for k in a:
                if k.startswith("tokens/") or k not in b:
                    continue
                d = abs(a[k] - b[k])
                worst.append((min(d, d / max(abs(a[k]), 1e-30)), d, f"step{i + 1} {k}", a[k], b[k]))
        for k, v in weights.items():
            d = (v.double() - got_w[k].double()).abs()
            rel = d / v.double().abs().clamp_min(1e-30)
            worst.append((float(torch.minimum(d, rel).max()), float(d.max()), k, float("nan"), float("nan")))
        worst.sort(reverse=True)
        print(f"[parity] {case}: perms equal: {golden['permutations'] == got['permutations']}; "
              f"largest min(abs, rel) moves vs float32 goldens:")
        for score, d, k, a, b in worst[:6]:
            print(f"    {score:.2e} (abs {d:.2e})  {k}  {a:.8g} vs {b:.8g}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="regenerate fixtures and goldens into a temp dir; compare byte for byte; "
                         "exit 1 on a difference")
    ap.add_argument("--rebuild-fixtures", action="store_true",
                    help="rewrite fixtures/parity/{model,adapter,value_head.safetensors,batch.json} even if present")
    ap.add_argument("--probe", choices=["float64"], help="rerun in this dtype and print how far the goldens move")
    args = ap.parse_args(argv)

    if os.environ.get(ENV_FLAG) != "1" or not _in_parity_venv():
        ensure_venv_and_reexec()
    _setup_determinism()

    if args.check:
        return check()
    if args.probe:
        return probe(args.probe)
    have = all((FIXTURES / p).exists() for p in ("model", "adapter", "value_head.safetensors", "batch.json"))
    if args.rebuild_fixtures or not have:
        for p in ("model", "adapter"):
            shutil.rmtree(FIXTURES / p, ignore_errors=True)
        build_fixtures(FIXTURES)
        print(f"[parity] wrote fixtures under {FIXTURES.relative_to(REPO)}")
    shutil.rmtree(FIXTURES / "golden", ignore_errors=True)
    write_goldens(FIXTURES, FIXTURES / "golden")
    total = sum((FIXTURES / f).stat().st_size for f in _files(FIXTURES))
    print(f"[parity] wrote goldens under {(FIXTURES / 'golden').relative_to(REPO)}; fixtures/parity: {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

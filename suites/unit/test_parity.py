"""The harness's PPO step against TRL 0.11.4's ``PPOTrainer.step``, number for number (issue 8).

``tools/parity/make_golden.py`` ran TRL 0.11.4 (in its own ``.parity-venv``) on the fixtures under
``fixtures/parity``: a tiny T5, a LoRA adapter with nonzero B, a value head, and a batch of 8 queries,
responses and scores. For each case it ran two ``step`` calls and recorded TRL's statistics, the
mini-batch permutations TRL drew and the trainable weights after the second step. These tests read
only those files: TRL is not needed (nor installed) here.

* ``test_golden_files``: the goldens exist, are consistent and are small.
* ``test_fixture_forward_matches_trl``: transformers 5 / peft here compute the same logits and values
  for the fixtures as transformers 4.46.3 / peft 0.13.2 did under TRL (no harness involved). If this
  fails, every PPO comparison below is meaningless: the model forward itself changed.
* ``test_harness_forward_matches_trl``: the same through the harness's policy (``load_policy``).
* ``test_ppo_step_matches_trl``: the harness's ``ppo_step`` (``trl_compat=True``: every ``TRLQuirks`` on),
  replaying TRL's permutations, reproduces TRL's statistics for both steps and the updated weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
FX = REPO / "fixtures" / "parity"
GOLDEN = FX / "golden"
CASES = ["kl_adaptive", "full_fixed", "abs_fixed", "mse_adaptive",  # kl penalties x KL controllers
         "ratio_skip_fixed", "early_stop_fixed", "whiten_fixed", "gradclip_fixed"]  # the other trl_compat paths
# Every TRL 0.11.4 quirk the harness does not copy by default is a TRLQuirks field, all on with trl_compat
# (docs/ppo.md), so every case must match. (gradclip_fixed: TRL clips only the first mini-batch of the trainer's
# life: TRLQuirks.clip_only_first_minibatch, whose state lives in the PPOState across both steps.)
N_STEPS = 2  # make_golden.py runs PPOTrainer.step twice per case on the same batch

# A harness number passes when it is within TOL of TRL's either absolutely OR relatively, whichever is
# looser for that value: |got - want| <= max(TOL, TOL * |want|). Both sides run float32 on a CPU; the
# remaining differences are summation order (~1e-7 relative), so 1e-5 catches any formula difference.
# (``--probe float64`` of make_golden.py shows how much the goldens move in float64: far less than TOL.)
TOL = 1e-5
MAX_FIXTURE_BYTES = 1_000_000

# TRL statistics the harness must reproduce, for both steps of every case.
REQUIRED_STATS = [
    "objective/kl", "objective/kl_coef", "objective/entropy",
    "ppo/loss/policy", "ppo/loss/value", "ppo/loss/total",
    "ppo/policy/approxkl", "ppo/policy/policykl", "ppo/policy/clipfrac", "ppo/policy/advantages_mean",
    "ppo/returns/mean", "ppo/val/vpred", "ppo/val/error", "ppo/val/clipfrac",
]
# Also compared whenever the harness reports a statistic of the same name.
OPTIONAL_STATS = [
    "ppo/mean_non_score_reward", "ppo/mean_scores", "ppo/std_scores", "ppo/policy/entropy",
    "ppo/returns/var", "ppo/val/mean", "ppo/val/var", "ppo/val/var_explained", "ppo/learning_rate",
    "tokens/queries_len_mean", "tokens/queries_len_std", "tokens/responses_len_mean", "tokens/responses_len_std",
]
# TRL counts the leading decoder-start token in a response's length; harness responses exclude it.
RESPONSE_LEN_SHIFT = {"tokens/responses_len_mean": -1.0}


def close(got: float, want: float) -> bool:
    return abs(got - want) <= max(TOL, TOL * abs(want))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _golden(case: str) -> dict:
    return _read_json(GOLDEN / f"{case}.json")


# ------------------------------------------------------------------------------------ the files

def test_golden_files():
    for name in ("model/config.json", "model/model.safetensors", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "value_head.safetensors", "batch.json",
                 "golden/forward.safetensors"):
        assert (FX / name).is_file(), f"missing fixture {name}: run python tools/parity/make_golden.py"
    for case in CASES:
        assert (GOLDEN / f"{case}.json").is_file(), case
        assert (GOLDEN / f"{case}.safetensors").is_file(), case
        golden = _golden(case)
        cfg = golden["config"]
        assert len(golden["steps"]) == N_STEPS
        # one permutation per epoch run; early stopping can end a step's epochs early
        assert N_STEPS <= len(golden["permutations"]) <= N_STEPS * cfg["ppo_epochs"]
        for perm in golden["permutations"]:
            assert sorted(perm) == list(range(cfg["batch_size"]))
        for step in golden["steps"]:
            missing = [k for k in REQUIRED_STATS if k not in step]
            assert not missing, f"{case}: golden lacks {missing}"
            assert all(math.isfinite(v) for v in step.values())
    total = sum(p.stat().st_size for p in FX.rglob("*") if p.is_file())
    assert total < MAX_FIXTURE_BYTES, f"fixtures/parity holds {total} bytes (limit {MAX_FIXTURE_BYTES})"

    batch = _read_json(FX / "batch.json")
    assert len(batch["queries"]) == len(batch["responses"]) == len(batch["scores"]) == 8
    assert all(q[-1] == batch["eos_token_id"] and 0 not in q for q in batch["queries"])
    assert all(r[0] == batch["decoder_start_token_id"] and len(r) >= 3 for r in batch["responses"])
    assert any(r[-1] != batch["eos_token_id"] for r in batch["responses"]), "no truncated response"
    assert any(s < 0 for s in batch["scores"]) and any(s > 0 for s in batch["scores"])


def test_goldens_exercise_the_step():
    """The cases are not degenerate: clipping happens, the KL controller moves, the weights move."""
    init = load_file(str(FX / "adapter" / "adapter_model.safetensors"))
    assert all(v.abs().max() > 0 for k, v in init.items() if "lora_B" in k), "LoRA B must be nonzero"
    for case in CASES:
        golden = _golden(case)
        s1, s2 = golden["steps"]
        assert s1["ppo/policy/clipfrac"] > 0 and s1["ppo/val/clipfrac"] > 0, case
        assert 0.05 < s1["objective/kl"] < 10, case
        if golden["config"]["adap_kl_ctrl"]:
            assert s2["objective/kl_coef"] != s1["objective/kl_coef"], case
        else:
            assert s2["objective/kl_coef"] == s1["objective/kl_coef"], case
        weights = load_file(str(GOLDEN / f"{case}.safetensors"))
        moved = max(float((weights[f"adapter.{k}"] - v).abs().max()) for k, v in init.items())
        assert moved > 100 * TOL, f"{case}: adapter weights moved only {moved}"


# ------------------------------------------------------------------------------------ the forward

def _fixture_forward_inputs(fwd: dict) -> dict:
    return {k: fwd[k] for k in ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")}


def _chunks(inputs: dict, size: int = 4):
    n = inputs["input_ids"].shape[0]
    for i in range(0, n, size):
        yield {k: v[i:i + size] for k, v in inputs.items()}


def _assert_tensor_close(got: torch.Tensor, want: torch.Tensor, what: str, mask: torch.Tensor | None = None):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.double(), want.double()
    bound = torch.clamp(want.abs() * TOL, min=TOL)
    bad = (got - want).abs() > bound
    if mask is not None:
        bad &= mask.bool().reshape(mask.shape + (1,) * (bad.dim() - mask.dim()))
    if bad.any():
        diff = (got - want).abs()
        i = int(torch.argmax(torch.where(bad, diff, torch.zeros_like(diff))))
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} values differ; worst at flat index {i}: "
                             f"{got.flatten()[i].item():.9g} vs TRL {want.flatten()[i].item():.9g}")


def test_fixture_forward_matches_trl():
    """transformers 5 + peft here == transformers 4.46.3 + peft 0.13.2 under TRL, on the fixtures."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    fwd = load_file(str(GOLDEN / "forward.safetensors"))
    base = AutoModelForSeq2SeqLM.from_pretrained(str(FX / "model"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(FX / "adapter"), is_trainable=True).eval()
    vh = load_file(str(FX / "value_head.safetensors"))
    logits, values, ref_logits = [], [], []
    with torch.no_grad():
        for part in _chunks(_fixture_forward_inputs(fwd)):
            out = model(**part, output_hidden_states=True, return_dict=True)
            logits.append(out.logits[:, :-1])
            hidden = out.decoder_hidden_states[-1]
            values.append((hidden @ vh["summary.weight"].T + vh["summary.bias"]).squeeze(-1)[:, :-1])
            with model.disable_adapter():
                ref_logits.append(model(**part, return_dict=True).logits[:, :-1])
    valid = fwd["decoder_attention_mask"][:, 1:]  # padded decoder positions carry no meaning
    _assert_tensor_close(torch.cat(logits), fwd["logits"], "policy logits", valid)
    _assert_tensor_close(torch.cat(ref_logits), fwd["ref_logits"], "reference logits", valid)
    _assert_tensor_close(torch.cat(values), fwd["values"], "values", valid)


def _load_harness_policy():
    from harness.config import PolicyConfig
    from harness.models import load_policy

    # TRL 0.11.4's reference for a LoRA policy: the base with the adapter disabled (policy.reference=base)
    policy = load_policy(PolicyConfig(model=str(FX / "model"), adapter=str(FX / "adapter"), dtype="float32",
                                      reference="base"), device="cpu")
    vh = load_file(str(FX / "value_head.safetensors"))
    policy.value_head.summary.load_state_dict({"weight": vh["summary.weight"], "bias": vh["summary.bias"]})
    return policy


def test_harness_forward_matches_trl():
    """The harness's policy (forward, reference, mask) on the fixtures == TRL's batched_forward_pass."""
    from harness.ppo.batch import prepare_inputs, response_mask

    fwd = load_file(str(GOLDEN / "forward.safetensors"))
    batch = _read_json(FX / "batch.json")
    policy = _load_harness_policy()
    inputs = prepare_inputs([torch.tensor(q) for q in batch["queries"]],
                            [torch.tensor(r[1:]) for r in batch["responses"]],
                            pad_token_id=0, decoder_start_token_id=0, device=torch.device("cpu"))
    for k, v in _fixture_forward_inputs(fwd).items():
        assert torch.equal(inputs[k], v), f"harness {k} differs from TRL's padded {k}"
    assert torch.equal(response_mask(inputs["decoder_attention_mask"], mask_first_action=True).long(), fwd["masks"]), \
        "the harness's TRLQuirks.mask_first_action mask differs from TRL's batched_forward_pass mask"
    logits, values, ref_logits = [], [], []
    with torch.no_grad():
        for part in _chunks(inputs):
            lg, val = policy(**part)
            logits.append(lg[:, :-1])
            values.append(val[:, :-1])
            ref_logits.append(policy.reference_logits(**part)[:, :-1])
    valid = fwd["decoder_attention_mask"][:, 1:]
    _assert_tensor_close(torch.cat(logits), fwd["logits"], "harness policy logits", valid)
    _assert_tensor_close(torch.cat(ref_logits), fwd["ref_logits"], "harness reference logits", valid)
    _assert_tensor_close(torch.cat(values), fwd["values"], "harness values", valid)


# ------------------------------------------------------------------------------------ the PPO step

def run_harness(case: str):
    """The harness's ppo_step, twice, from the fixture weights, replaying TRL's permutations."""
    from harness.config import PPOConfig
    from harness.ppo.step import PPOState, ppo_step
    from suites.weights import trainable_state_dict

    golden = _golden(case)
    g = golden["config"]
    # the goldens use no score scaling/normalisation/clipping: ppo_step's default ScoreOptions()
    assert not g["use_score_scaling"] and not g["use_score_norm"] and g["score_clip"] is None
    batch = _read_json(FX / "batch.json")
    torch.manual_seed(0)
    policy = _load_harness_policy()
    fields = ["batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs", "learning_rate",
              "kl_penalty", "adap_kl_ctrl", "init_kl_coef", "target", "horizon", "gamma", "lam", "cliprange",
              "cliprange_value", "vf_coef", "whiten_rewards", "max_grad_norm", "early_stopping", "target_kl",
              "ratio_threshold"]
    cfg = PPOConfig(**{k: g[k] for k in fields}, trl_compat=True)
    # Adam, the case's KL controller, every TRLQuirks on; lives both steps
    state = PPOState.create(policy, cfg, pad_token_id=0, decoder_start_token_id=0)
    perms = iter(golden["permutations"])
    steps = []
    for _ in range(N_STEPS):
        stats = ppo_step(policy, state,
                         queries=[torch.tensor(q) for q in batch["queries"]],
                         responses=[torch.tensor(r[1:]) for r in batch["responses"]],  # no decoder-start token
                         scores=torch.tensor(batch["scores"]), orders=perms)
        steps.append(stats)
    leftover = list(perms)
    return golden, steps, trainable_state_dict(policy), leftover


def compare_stats(golden_steps: list[dict], steps: list[dict]) -> tuple[list[str], dict[str, float]]:
    """Mismatch messages and, per statistic, the largest min(abs, rel) difference over the steps."""
    problems, worst = [], {}
    for i, (want, got) in enumerate(zip(golden_steps, steps), start=1):
        for k in REQUIRED_STATS + OPTIONAL_STATS:
            if k not in got:
                if k in REQUIRED_STATS:
                    problems.append(f"step {i}: the harness does not report {k}")
                continue
            w = want[k]
            g = float(got[k]) - RESPONSE_LEN_SHIFT.get(k, 0.0)
            d = abs(g - w)
            worst[k] = max(worst.get(k, 0.0), min(d, d / abs(w)) if w else d)
            if not close(g, w):
                problems.append(f"step {i}: {k} = {g:.9g}, TRL {w:.9g} (diff {d:.3g})")
    return problems, worst


def compare_weights(golden_w: dict, got_w: dict) -> tuple[list[str], dict[str, float]]:
    problems, worst = [], {}
    if set(golden_w) != set(got_w):
        problems.append(f"weight keys differ: only TRL {sorted(set(golden_w) - set(got_w))[:4]}, "
                        f"only harness {sorted(set(got_w) - set(golden_w))[:4]}")
    for k in sorted(set(golden_w) & set(got_w)):
        want, got = golden_w[k].double(), got_w[k].detach().double().cpu()
        if want.shape != got.shape:
            problems.append(f"{k}: shape {tuple(got.shape)} != TRL {tuple(want.shape)}")
            continue
        d = (got - want).abs()
        worst[k] = float(torch.minimum(d, d / want.abs().clamp_min(1e-30)).max())
        bad = d > torch.clamp(want.abs() * TOL, min=TOL)
        if bad.any():
            problems.append(f"{k}: {int(bad.sum())}/{bad.numel()} entries differ, max diff {float(d.max()):.3g}")
    return problems, worst


@pytest.mark.parametrize("case", CASES)
def test_ppo_step_matches_trl(case):
    golden, steps, weights, leftover = run_harness(case)
    assert not leftover, f"the harness used {len(golden['permutations']) - len(leftover)} of TRL's " \
                         f"{len(golden['permutations'])} permutations (one per epoch run expected)"
    assert all(not s.get("skipped") for s in steps), [s.get("skip_reason") for s in steps]
    stat_problems, _ = compare_stats(golden["steps"], steps)
    weight_problems, _ = compare_weights(load_file(str(GOLDEN / f"{case}.safetensors")), weights)
    problems = stat_problems + weight_problems
    assert not problems, f"{case}: the harness differs from TRL 0.11.4:\n  " + "\n  ".join(problems[:40])

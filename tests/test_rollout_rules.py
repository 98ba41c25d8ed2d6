"""Rule rewards in the rollout calls, one process: the prompts' row numbers reach a verifiable
reward aligned with their responses, and dynamic sampling keeps the first groups with a spread
over generation rounds (filling with flagged groups when the rounds run out)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lightning_real.algorithms.grpo import GRPOConfig
from lightning_real.data.arithmetic import exact_match
from lightning_real.data.tokenizer import byte_tokenizer
from lightning_real.data.verifiable import VerifiableReward
from lightning_real.graphs.grpo import KEPT_KEY, grpo_graph
from lightning_real.models.generate import GenerationConfig, GenerationOutput
from lightning_real.modules.calls import generate_call, reward_call
from lightning_real.modules.dynamic import dynamic_generate_call

TOK = byte_tokenizer()


class ScriptedGenerator:
    """Answers row ``r`` (global index ``row_offset + i``) with ``answers[r]``, then EOS."""

    backend = "scripted"
    last_logprob_diff = None

    def __init__(self, answers: dict[int, str]) -> None:
        self.answers = answers
        self.offsets: list[int] = []

    def generate(
        self,
        shard: Any,
        prompts: torch.Tensor,
        prompt_mask: torch.Tensor,
        config: GenerationConfig,
        row_offset: int | None,
    ) -> GenerationOutput:
        assert row_offset is not None
        self.offsets.append(row_offset)
        width = config.max_new_tokens
        resp = torch.full((prompts.shape[0], width), TOK.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(resp)
        for i in range(prompts.shape[0]):
            ids = [
                *TOK.encode(self.answers.get(row_offset + i, "x"), add_special_tokens=False),
                TOK.eos_token_id,
            ]
            resp[i, : len(ids)] = torch.tensor(ids[:width])
            mask[i, : len(ids)] = 1
        return GenerationOutput(
            torch.cat([prompts, resp], 1),
            torch.zeros(resp.shape, dtype=torch.float32),
            mask,
            mask.sum(-1),
            torch.zeros(prompts.shape[0], dtype=torch.bool),
        )


def _shard(dp_rank: int = 0) -> Any:
    return SimpleNamespace(groups=SimpleNamespace(dp_rank=dp_rank, dp=None, layout=SimpleNamespace(dp=1)))


def _prompts(texts: list[str], index: list[int]) -> dict[str, torch.Tensor]:
    from lightning_real.data.collate import pad_left

    ids, mask = pad_left([[TOK.bos_token_id, *TOK.encode(t, add_special_tokens=False)] for t in texts], 0)
    return {"prompts": ids, "prompt_mask": mask, "index": torch.tensor(index)}


def test_prompt_index_reaches_the_verifiable_reward_with_its_responses() -> None:
    # rows 4..7 of this replica (dp_rank 1 of 2 prompts x 2 samples): the offsets are global
    answers = {4: "85", 5: "84", 6: "7", 7: "= 7."}
    gen = ScriptedGenerator(answers)
    cfg = GenerationConfig(max_new_tokens=6, eos_token_id=TOK.eos_token_id)
    call = generate_call(gen, cfg, lambda: 1, group_size=2, with_index=True)
    x = _prompts(["What is 37+48?", "What is 3+4?"], [11, 2])
    rows, _ = call(_shard(dp_rank=1), x)
    assert gen.offsets == [4]
    assert rows["prompt_index"].tolist() == [11, 11, 2, 2]
    truths = {11: "85", 2: "7"}
    reward = VerifiableReward(exact_match, [truths.get(i, "0") for i in range(12)], TOK)
    scores, _ = reward_call(reward, 1, index_key="prompt_index")(None, rows)
    assert scores["rewards"].tolist() == [1.0, 0.0, 1.0, 1.0]
    # without the row numbers the rule says what it misses, instead of scoring the wrong rows
    rows.pop("prompt_index")
    with pytest.raises(ValueError, match="reads each row's prompt_index"):
        reward_call(reward, 1)(None, rows)


class SpreadRule:
    """Scores 1 for a response of an odd global row when the prompt's row number is in
    ``spread``, else 0: a group of two has a spread exactly when its prompt is in ``spread``."""

    needs_index = True

    def __init__(self, spread: set[int]) -> None:
        self.spread = spread

    def __call__(
        self, seq: torch.Tensor, am: torch.Tensor, lm: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        first = [int(r[m.bool()][0]) for r, m in zip(seq, lm)]  # the answer's first byte
        return torch.tensor([float(i in self.spread and f % 2 == 1) for i, f in zip(index.tolist(), first)])


def _dynamic(spread: set[int]) -> tuple[dict[str, torch.Tensor], dict[str, float], list[int]]:
    # answers "0", "1", "2", ...: the first byte's parity is the global row's parity
    gen = ScriptedGenerator({r: str(r % 10) for r in range(12)})
    cfg = GenerationConfig(max_new_tokens=3, eos_token_id=TOK.eos_token_id)
    call = dynamic_generate_call(gen, cfg, lambda: 5, 2, 2, 3, SpreadRule(spread), with_index=True)
    x = _prompts([f"p{i}" for i in range(6)], list(range(6)))
    rows, metrics = call(_shard(), x)
    return rows, metrics, gen.offsets


def test_dynamic_sampling_keeps_the_first_groups_with_a_spread() -> None:
    rows, metrics, offsets = _dynamic({1, 4, 5})
    # round 0 keeps prompt 1, round 1 (prompts 2, 3) nothing, round 2 prompt 4: full, prompt 5 unused
    assert offsets == [0, 4, 8]  # each round's rows have their own sampling streams
    assert rows["prompt_index"].tolist() == [1, 1, 4, 4]
    assert rows[KEPT_KEY].tolist() == [1, 1, 1, 1]
    assert rows["rewards"].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert metrics == {"dapo/gen_rounds": 3.0, "dapo/kept_groups": 2.0, "dapo/kept_frac": 2 / 6}


def test_dynamic_sampling_fills_with_flagged_groups_when_rounds_run_out() -> None:
    rows, metrics, _ = _dynamic({3})
    assert rows["prompt_index"].tolist() == [3, 3, 0, 0]  # the kept group, then the first dropped
    assert rows[KEPT_KEY].tolist() == [1, 1, 0, 0]
    assert metrics["dapo/kept_groups"] == 1.0 and metrics["dapo/gen_rounds"] == 3.0


def test_dynamic_sampling_graph_scores_inside_generation() -> None:
    g = grpo_graph(8, 2, use_ref=False, with_index=True, dynamic_sampling=True)
    assert g.names == ("actor_gen", "actor_train")
    assert g.sources == ("prompts", "prompt_mask", "index")
    assert {"rewards", KEPT_KEY, "prompt_index"} <= set(g.call("actor_gen").output_keys)
    tis = grpo_graph(8, 2, actor_logp=True)
    assert tis.names == ("actor_gen", "ref_inf", "rew_inf", "actor_inf", "actor_train")
    assert "actor_logp" in tis.call("actor_train").input_keys


def test_dynamic_sampling_needs_a_rule_reward() -> None:
    from lightning_real.models.spec import tiny_spec
    from lightning_real.modules.grpo import GRPOModule

    with pytest.raises(ValueError, match=r"dynamic_sampling=True .* needs a rule reward"):
        GRPOModule(tiny_spec("llama"), tiny_spec("llama", head="value"), grpo=GRPOConfig.preset("dapo"))
    m = GRPOModule(tiny_spec("llama"), batch_size=4, grpo=GRPOConfig.preset("dapo", max_gen_rounds=3))
    assert m.prompts_per_step == 12
    with pytest.raises(
        ValueError, match=r"gave 4 prompts but GRPOModule reads 12 .*batch_size=4 x grpo.max_gen_rounds=3"
    ):
        m.make_source(_prompts(["a", "b", "c", "d"], [0, 1, 2, 3]))


@pytest.mark.parametrize(
    ("name", "packable"),
    [
        ("grpo", False),
        ("rloo", False),
        ("gspo", False),
        ("dapo", True),
        ("dr_grpo", True),
        ("reinforce_pp", True),
    ],
)
def test_packed_training_only_for_token_sum_losses(name: str, packable: bool) -> None:
    # seq-mean-token-mean and GSPO's sequence ratio need each sequence apart; token sums survive packing
    from lightning_real.models.spec import tiny_spec
    from lightning_real.modules.grpo import GRPOModule

    m = GRPOModule(tiny_spec("llama"), batch_size=4, grpo=GRPOConfig.preset(name))
    training = m.role_training("actor")
    assert training is not None and training.packable is packable

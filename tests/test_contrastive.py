"""The CoLD rule (contrastive.py) on numbers worked by hand, the option's validation, and the transformers
reference (integrations/hf.contrastive_tokens) on the tiny model."""

import math

import pytest
import torch

from catalogue_variants import merged_tokens
from expertweave_ascend.adapters import EsftAdapter
from expertweave_ascend.contrastive import Contrastive, cold_choose, cold_scores, parse_contrastive
from expertweave_ascend.integrations.hf import contrastive_tokens, load_model, merge_adapter

# log-probabilities chosen so the arithmetic is exact: the adapter prefers token 0, the base prefers it more
ADAPTER = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
BASE = torch.log(torch.tensor([[0.8, 0.1, 0.05, 0.05]]))


def scores(alpha, beta):
    return cold_scores(ADAPTER, BASE, torch.tensor([alpha]), torch.tensor([beta]))[0]


def test_candidates_are_the_tokens_within_alpha_of_the_adapters_best():
    assert torch.isfinite(scores(0.5, 1.0)).tolist() == [True, True, False, False]  # 0.15 < 0.5 * 0.5
    assert torch.isfinite(scores(0.3, 1.0)).tolist() == [True, True, True, False]  # 0.15 >= 0.3 * 0.5
    assert torch.isfinite(scores(1.0, 1.0)).tolist() == [True, False, False, False]


def test_the_score_favours_what_the_adapter_likes_more_than_the_base():
    got = scores(0.3, 1.0)
    want = [2 * math.log(p) - math.log(q) for p, q in ((0.5, 0.8), (0.3, 0.1), (0.15, 0.05))]
    assert got[:3].tolist() == pytest.approx(want, abs=1e-5)
    assert int(cold_choose(got[None], torch.zeros(1))[0]) == 1  # 0.3^2/0.1 = 0.9 beats 0.5^2/0.8 = 0.31


def test_beta_zero_is_the_adapters_own_choice():
    assert int(cold_choose(scores(0.01, 0.0)[None], torch.zeros(1))[0]) == 0


def test_rows_take_their_own_alpha_and_beta():
    both = cold_scores(ADAPTER.repeat(2, 1), BASE.repeat(2, 1), torch.tensor([0.3, 0.3]), torch.tensor([0.0, 1.0]))
    assert cold_choose(both, torch.zeros(2)).tolist() == [0, 1]


def test_sampling_draws_only_candidates_and_repeats_with_a_seed():
    row = scores(0.3, 1.0)[None]
    draws = [int(cold_choose(row, torch.ones(1), [torch.Generator().manual_seed(s)])[0]) for s in range(200)]
    assert set(draws) == {0, 1, 2}  # token 3 is implausible, so never drawn
    again = [int(cold_choose(row, torch.ones(1), [torch.Generator().manual_seed(s)])[0]) for s in range(200)]
    assert draws == again


@pytest.mark.parametrize("value, message", [
    ([0.1, 0.5], "contrastive: expected an object"),
    ({"alpha": 0.1, "gamma": 1}, "contrastive: unknown field(s) gamma"),
    ({"alpha": 0}, "contrastive.alpha: 0 is outside (0, 1]"),
    ({"alpha": 1.5}, "contrastive.alpha: 1.5 is outside (0, 1]"),
    ({"beta": -0.5}, "contrastive.beta: -0.5 is outside [0, 100]"),
    ({"beta": 1e39}, "contrastive.beta: 1e+39 is outside [0, 100]"),
    ({"alpha": 10 ** 400}, "contrastive.alpha: expected a finite number, got 1000000000"),
    ({"beta": float("nan")}, "contrastive.beta: expected a finite number, got nan"),
    ({"alpha": "0.1"}, "contrastive.alpha: expected a finite number, got '0.1'"),
    ({"beta": True}, "contrastive.beta: expected a finite number, got True"),
])
def test_bad_options_get_one_error_naming_the_field(value, message):
    with pytest.raises(ValueError) as e:
        parse_contrastive(value)
    assert str(e.value).startswith(message)


def test_fields_left_out_take_the_defaults():
    assert parse_contrastive({}) == Contrastive(0.1, 0.5)
    assert parse_contrastive({"beta": 2}) == Contrastive(0.1, 2.0)
    assert parse_contrastive({"alpha": 1}) == Contrastive(1.0, 0.5)


def test_the_reference_with_beta_zero_is_plain_greedy_decoding_and_contrast_changes_it(tiny_decisive):
    base = load_model(tiny_decisive / "base", torch.float32)
    adapter = tiny_decisive / "adapters" / "law"
    law = merge_adapter(base, EsftAdapter.open(adapter))
    prompt = [5, 17, 42, 99]
    plain = merged_tokens(base, adapter, prompt, 8)
    assert contrastive_tokens(law, base, prompt, 8, Contrastive(0.1, 0.0)) == plain
    assert contrastive_tokens(law, base, prompt, 8, Contrastive(0.001, 5.0)) != plain


def test_the_catalogue_tells_adapters_tuning_non_expert_modules_without_loading_them(tiny_decisive, tmp_path):
    from expertweave_ascend.catalogue import AdapterCatalogue
    from test_variants import with_non_expert

    catalogue = AdapterCatalogue(named={"law": tiny_decisive / "adapters" / "law",
                                        "law-ne": with_non_expert(tiny_decisive, "law", tmp_path / "law-ne"),
                                        "broken": tmp_path / "missing"})
    assert [catalogue.tunes_non_experts(n) for n in ("law", "law-ne", "broken", "unknown")] == [False, True, None, None]

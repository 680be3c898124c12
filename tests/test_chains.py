"""The persistent chain bank: stable ids, re-initialisation, state round trips, re-sharding."""

import pytest
import torch

from distributed_ebm.chains import ChainBank, split_bank_states


def test_full_batch_takes_every_chain_in_order_and_writes_back():
    bank = ChainBank.create(6, (2,), init="noise", generator=torch.Generator().manual_seed(0))
    index, x = bank.sample(6)
    assert torch.equal(index, torch.arange(6))
    bank.write(index, x + 1)
    assert torch.allclose(bank.states, x + 1)


def test_partial_batch_is_random_and_reproducible():
    bank = ChainBank.create(100, (1,))
    a, _ = bank.sample(10, torch.Generator().manual_seed(1))
    b, _ = bank.sample(10, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and len(set(a.tolist())) == 10


def test_reinit_probability_restarts_about_that_fraction():
    bank = ChainBank.create(2000, (1,), init="zeros", reinit_prob=0.3)
    bank.states += 5.0
    _, x = bank.sample(2000, torch.Generator().manual_seed(0))
    fraction = float((x == 0).float().mean())
    assert 0.27 < fraction < 0.33
    assert torch.equal(bank.ids, torch.arange(2000))  # ids are stable through re-initialisation


def test_data_mean_init_and_validation():
    mean = torch.full((1, 1, 2, 2), 0.5)
    bank = ChainBank.create(3, (1, 2, 2), init="data_mean", init_value=mean)
    assert torch.equal(bank.states, mean.expand(3, 1, 2, 2))
    with pytest.raises(ValueError, match="data mean"):
        ChainBank.create(3, (1, 2, 2), init="data_mean")
    with pytest.raises(ValueError, match="exceeds"):
        bank.sample(4)


def test_state_dict_round_trip():
    bank = ChainBank.create(5, (3,), init="noise", first_id=10, generator=torch.Generator().manual_seed(2))
    other = ChainBank.create(5, (3,))
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.states, bank.states) and torch.equal(other.ids, torch.arange(10, 15))


@pytest.mark.parametrize("old,new", [(2, 3), (3, 2), (1, 4), (4, 1)])
def test_resplit_loses_and_duplicates_nothing(old, new):
    shards = [ChainBank.create(6, (2,), first_id=6 * r, init="noise").state_dict() for r in range(old)]
    resplit = split_bank_states(shards, new)
    ids = torch.cat([s["ids"] for s in resplit])
    assert sorted(ids.tolist()) == list(range(6 * old))
    by_id = {int(i): s for shard in shards for i, s in zip(shard["ids"], shard["states"])}
    for shard in resplit:
        for i, s in zip(shard["ids"], shard["states"]):
            assert torch.equal(by_id[int(i)], s)
    sizes = [len(s["ids"]) for s in resplit]
    assert max(sizes) - min(sizes) <= 1

"""EMA rules, atomic verified checkpoints, RNG capture/restore and the resumable batch order."""

import json
import os
import random
import stat

import numpy as np
import pytest
import torch
from _helpers import spawn_gloo_ranks, write_with_manifest
from torch import nn

from soflow_core.seeding import derive_seed, micro_batch_index, seeded_generator
from soflow_core.train import EpochStream
from soflow_core.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    checkpoint_path,
    latest_loadable_checkpoint,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    non_finite_entries,
    remove_stale_temporaries,
    restore_rng_state,
    save_checkpoint,
)
from soflow_core.train.ema import EMA, ema_coefficient


class Net(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)


def perturb(net: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g))
        net.norm.running_mean.add_(torch.randn(4, generator=g))


# ----------------------------------------------------------------------------- EMA


def test_ema_every_step_rule_matches_the_formula_and_copies_buffers():
    net = Net()
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    ema = EMA(net, decay=0.9, every=1)
    assert all(torch.equal(ema.params[k], initial[k]) for k in ema.params)  # starts at the initial weights
    expected = {k: initial[k].clone() for k in ema.params}
    for step in range(3):
        perturb(net, step)
        assert ema.update(net, step=step)
        for name, p in net.named_parameters():
            expected[name] = 0.9 * expected[name] + 0.1 * p.detach()
    for name in expected:
        torch.testing.assert_close(ema.params[name], expected[name], rtol=1e-6, atol=1e-7)
    assert torch.equal(ema.buffers["norm.running_mean"], net.norm.running_mean)
    target = Net(seed=5)
    ema.copy_to(target)
    torch.testing.assert_close(target.lin.weight, expected["lin.weight"], rtol=1e-6, atol=1e-7)
    assert torch.equal(target.norm.running_mean, net.norm.running_mean)


def test_ema_every_16_steps_in_float64():
    net = Net()
    ema = EMA(net, decay=0.9999, every=16, dtype=torch.float64)
    assert ema.params["lin.weight"].dtype == torch.float64
    keep = 0.9999**16
    expected = {n: p.detach().double().clone() for n, p in net.named_parameters()}
    updated_at = []
    for step in range(40):
        perturb(net, step)
        if ema.update(net, step=step):
            updated_at.append(step)
            for n, p in net.named_parameters():
                expected[n] = keep * expected[n] + (1 - keep) * p.detach().double()
    assert updated_at == [0, 16, 32]  # k mod 16 == 0, k counted before the increment
    for n in expected:
        torch.testing.assert_close(ema.params[n], expected[n], rtol=0, atol=1e-15)
    # The float64 shadow keeps increments that a float32 shadow would round away.
    big = nn.Linear(1, 1, bias=False)
    nn.init.constant_(big.weight, 1000.0)
    e64, e32 = EMA(big, decay=0.9999, every=1, dtype=torch.float64), EMA(big, decay=0.9999, every=1)
    with torch.no_grad():
        big.weight.add_(0.25)
    for step in range(10):
        e64.update(big, step=step)
        e32.update(big, step=step)
    assert e64.params["weight"].item() > 1000.0
    assert e32.params["weight"].item() == 1000.0


def test_ema_coefficient_state_dict_and_errors():
    assert ema_coefficient(0.5, 3) == 0.125
    net = Net()
    ema = EMA(net, decay=0.99, every=2)
    perturb(net, 0)
    ema.update(net, step=0)
    state = ema.state_dict()
    assert set(state) == set(net.state_dict())  # the module's own layout, loadable into it
    fresh = EMA(Net(seed=3), decay=0.99, every=2)
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.params[k], ema.params[k]) for k in ema.params)
    Net(seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="decay"):
        EMA(net, decay=1.0)
    with pytest.raises(ValueError, match="every"):
        EMA(net, every=0)
    with pytest.raises(ValueError, match="missing EMA entries"):
        fresh.load_state_dict({})
    with pytest.raises(ValueError, match="parameters the EMA was built from"):
        ema.update(nn.Linear(3, 4), step=0)


def _fsdp_ema_worker(rank: int, world: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
    torch.manual_seed(0)
    for p in net.parameters():
        nn.init.normal_(p)
    fully_shard(net)
    ema = EMA(net, decay=0.5, every=1, dtype=torch.float64)
    assert hasattr(ema.params["0.weight"], "device_mesh")  # a sharded shadow
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    ema.update(net, step=0)
    full = ema.state_dict()  # collective gather
    again = EMA(net, decay=0.5, every=1, dtype=torch.float64)
    again.load_state_dict(full)  # re-shards whole tensors
    assert torch.equal(again.state_dict()["0.weight"], full["0.weight"])
    if rank == 0:
        torch.save(full, out)


def test_ema_on_fsdp2_shards_equals_the_unsharded_ema(tmp_path):
    out = str(tmp_path / "ema.pt")
    spawn_gloo_ranks(_fsdp_ema_worker, out, world=2, tmp_path=tmp_path)
    net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
    torch.manual_seed(0)
    for p in net.parameters():
        nn.init.normal_(p)
    expected = {n: 0.5 * p.double() + 0.5 * 3.0 * p.double() for n, p in net.named_parameters()}
    got = torch.load(out)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n].detach())


# ----------------------------------------------------------------------------- checkpoints


def payload(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((64,), float(step))}, "config": {"lr": 1e-4}}


def test_checkpoint_round_trip_prune_and_plain_torch_load(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, payload(step), keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 20]
    assert not checkpoint_path(tmp_path, 10).with_suffix(".json").exists()
    path = latest_valid_checkpoint(tmp_path)
    assert path == checkpoint_path(tmp_path, 30) and path.name == "step-000000030.pt"
    loaded = load_checkpoint(path)
    assert loaded["step"] == 30 and torch.equal(loaded["model"]["w"], torch.full((64,), 30.0))
    assert torch.load(path, weights_only=True)["config"] == {"lr": 1e-4}  # a plain torch.save file
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["size"] == path.stat().st_size and len(manifest["sha256"]) == 64
    assert latest_valid_checkpoint(tmp_path / "nothing") is None


def test_crash_before_rename_leaves_the_previous_checkpoint_valid(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, payload(1))
    real_replace = os.replace

    def crash(src, dst):
        raise OSError("simulated crash between write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, 2, payload(2))
    monkeypatch.setattr(os, "replace", real_replace)
    assert not checkpoint_path(tmp_path, 2).exists()
    assert latest_valid_checkpoint(tmp_path) == checkpoint_path(tmp_path, 1)
    assert list(tmp_path.glob("*.tmp")) == []  # the temporary file is cleaned up

    # A crash after the payload's rename but before the manifest: the payload is incomplete.
    calls = []

    def crash_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("crash before the manifest")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_second)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 3, payload(3))
    monkeypatch.setattr(os, "replace", real_replace)
    assert checkpoint_path(tmp_path, 3).exists()
    with pytest.warns(UserWarning, match="step-000000003.pt: no manifest"):
        assert latest_valid_checkpoint(tmp_path) == checkpoint_path(tmp_path, 1)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_is_detected_and_skipped(tmp_path, damage):
    save_checkpoint(tmp_path, 5, payload(5))
    newest = save_checkpoint(tmp_path, 6, payload(6))
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))
    reason = "truncated" if damage == "truncate" else "SHA-256 differs"
    with pytest.raises(CheckpointError, match=reason) as info:
        load_checkpoint(newest)
    assert str(newest) in str(info.value) and isinstance(info.value, ValueError)
    with pytest.warns(UserWarning, match=f"skipping checkpoint {newest}"):
        assert latest_valid_checkpoint(tmp_path) == checkpoint_path(tmp_path, 5)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "step-000000099.pt")


def test_pruning_counts_valid_checkpoints_only_and_keeps_the_newest_valid(tmp_path):
    # Damaged checkpoints of higher steps, as an earlier run may leave them: a torn payload without a
    # manifest, a payload whose bytes no longer match its manifest, and a stray manifest-less file.
    save_checkpoint(tmp_path, 900, payload(900))
    data = bytearray(checkpoint_path(tmp_path, 900).read_bytes())
    data[len(data) // 2] ^= 0xFF
    checkpoint_path(tmp_path, 900).write_bytes(bytes(data))
    checkpoint_path(tmp_path, 800).write_bytes(b"torn")
    for step in (1, 2, 3):
        written = save_checkpoint(tmp_path, step, payload(step), keep=2)
        assert written.exists() and latest_valid_checkpoint(tmp_path) == written
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 2]  # the damaged ones are gone, two valid kept

    # The newest valid checkpoint survives even when the one written has a lower step.
    save_checkpoint(tmp_path, 50, payload(50))
    save_checkpoint(tmp_path, 4, payload(4), keep=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [50, 4]


def test_pruning_never_removes_the_multiples_of_keep_every(tmp_path):
    """keep=2 newest plus every multiple of 4, at every save; the multiples do not count among the newest."""
    for step in range(1, 11):
        save_checkpoint(tmp_path, step, payload(step), keep=2, keep_every=4)
        newest = [s for s in range(step, 0, -1)][:2]
        expected = sorted({*newest, *(s for s in range(4, step + 1, 4))}, reverse=True)
        assert [s for s, _ in list_checkpoints(tmp_path)] == expected, step
    assert all(load_checkpoint(checkpoint_path(tmp_path, s))["step"] == s for s in (4, 8, 9, 10))
    # A multiple that is damaged is kept too (it is never read by pruning); keep_every=1 keeps everything.
    checkpoint_path(tmp_path, 4).write_bytes(b"torn")
    save_checkpoint(tmp_path, 11, payload(11), keep=1, keep_every=4)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [11, 8, 4]
    for step in (12, 13):
        save_checkpoint(tmp_path, step, payload(step), keep=1, keep_every=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [13, 12, 11, 8, 4]
    with pytest.raises(ValueError, match="keep_every"):
        save_checkpoint(tmp_path, 14, payload(14), keep=1, keep_every=0)


def test_a_folder_at_a_checkpoints_name_is_no_checkpoint_and_is_never_written_over(tmp_path):
    save_checkpoint(tmp_path, 1, payload(1))
    checkpoint_path(tmp_path, 2).mkdir()  # what `mkdir run/checkpoints/step-000000002.pt` leaves
    checkpoint_path(tmp_path, 3).with_suffix(".json").mkdir()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert latest_valid_checkpoint(tmp_path) == checkpoint_path(tmp_path, 1)
    for step in (2, 3):
        with pytest.raises(ValueError, match=f"step-00000000{step}.(pt|json) exists and is not a file"):
            save_checkpoint(tmp_path, step, payload(step), keep=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1] and list(tmp_path.glob(".*")) == []
    save_checkpoint(tmp_path, 4, payload(4), keep=1)  # pruning passes the folders by
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4] and checkpoint_path(tmp_path, 2).is_dir()


def test_atomic_save_gives_the_ordinary_mode_whatever_the_writer_does(tmp_path):
    """A writer that replaces the file it is given (safetensors does) still leaves 0o666 less the umask."""
    from soflow_core._files import atomic_save

    def replace_privately(tmp):
        tmp.unlink()
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))

    old = os.umask(0o022)
    try:
        atomic_save(tmp_path / "weights.bin", replace_privately)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "weights.bin").stat().st_mode) == 0o644


def test_save_refuses_a_payload_that_would_not_load(tmp_path):
    save_checkpoint(tmp_path, 1, payload(1))
    with pytest.raises(ValueError, match=r"weights_only.*numpy.*payload\['data'\]\['order'\] \(numpy.ndarray\)"):
        save_checkpoint(tmp_path, 2, {"data": {"order": np.arange(3)}})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1] and list(tmp_path.glob(".*")) == []
    assert latest_valid_checkpoint(tmp_path) == checkpoint_path(tmp_path, 1)


def test_manifest_valid_but_unusable_checkpoints_are_reported_and_skipped(tmp_path):
    save_checkpoint(tmp_path, 1, payload(1))
    write_with_manifest(tmp_path, 2, {"model": np.zeros(2)})  # weights_only refuses it
    write_with_manifest(tmp_path, 3, [1, 2])  # not a dict
    write_with_manifest(tmp_path, 4, {"config": {}})  # a dict the caller cannot use

    def check(path, loaded):
        if "model" not in loaded:
            raise CheckpointError(path, "no 'model' entry")

    with pytest.warns(UserWarning) as caught:
        path, loaded = latest_loadable_checkpoint(tmp_path, check=check)
    assert path == checkpoint_path(tmp_path, 1) and loaded["step"] == 1
    reasons = [str(w.message) for w in caught]
    assert "no 'model' entry" in reasons[0] and "not a dict" in reasons[1] and "torch.load failed" in reasons[2]
    assert latest_loadable_checkpoint(tmp_path / "nothing") is None


def test_checkpoint_files_get_the_ordinary_mode_and_stale_temporaries_are_removed(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path, 1, payload(1))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 == stat.S_IMODE(path.with_suffix(".json").stat().st_mode)
    stale = [tmp_path / ".step-000000002.pt.k2x_9a.tmp", tmp_path / ".step-000000002.json.abc123.tmp"]
    for file in stale:
        file.write_bytes(b"partial")
    (tmp_path / "notes.tmp").write_text("not ours")
    assert remove_stale_temporaries(tmp_path) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.tmp", "step-000000001.json", "step-000000001.pt"]


def test_non_finite_entries_name_where_they_sit():
    tree = {"model": {"w": torch.tensor([1.0, float("inf")])}, "opt": [torch.zeros(2), torch.full((3,), float("nan"))]}
    assert non_finite_entries(tree) == ["payload['model']['w'] (1 of 2 values)", "payload['opt'][1] (3 of 3 values)"]
    assert non_finite_entries({"ids": torch.arange(3), "rng": torch.zeros(4, dtype=torch.uint8), "x": 1.0}) == []


def test_rng_capture_and_restore_replays_every_stream():
    generator = torch.Generator().manual_seed(3)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(4)
    state = capture_rng_state({"loop": generator})

    def draw():
        return (
            random.random(),
            np.random.randn(3).tolist(),
            torch.rand(3).tolist(),
            torch.rand(2, generator=generator),
        )

    first = draw()
    restore_rng_state(state, {"loop": generator})
    second = draw()
    assert first[:3] == second[:3] and torch.equal(first[3], second[3])
    with pytest.raises(ValueError, match="no saved state"):
        restore_rng_state(state, {"other": torch.Generator()})


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    np.random.seed(7)
    save_checkpoint(tmp_path, 0, {"rng": capture_rng_state()})
    expected = np.random.rand(4)
    restore_rng_state(load_checkpoint(checkpoint_path(tmp_path, 0))["rng"])
    assert np.array_equal(np.random.rand(4), expected)


# ----------------------------------------------------------------------------- batch order


def test_epoch_stream_covers_each_epoch_and_crosses_epochs():
    stream = EpochStream(num_samples=7, seed=3)
    first, second = stream.epoch_order(0), stream.epoch_order(1)
    assert sorted(first.tolist()) == list(range(7)) and not np.array_equal(first, second)
    across = stream.indices(5, 5)
    assert across.tolist() == first[5:].tolist() + second[:3].tolist()
    # Resuming at any position continues the identical stream.
    whole = stream.indices(0, 30)
    assert np.array_equal(np.concatenate([stream.indices(0, 11), stream.indices(11, 19)]), whole)
    assert EpochStream(num_samples=4, shuffle=False).indices(2, 4).tolist() == [2, 3, 0, 1]


def test_micro_batches_do_not_depend_on_how_ranks_share_them():
    stream = EpochStream(num_samples=50, seed=0)
    one_rank = [stream.micro_batch(position=8, micro_batch_size=3, micro_step=j, rank=0, world_size=1) for j in (0, 1)]
    two_ranks = [stream.micro_batch(position=8, micro_batch_size=3, micro_step=0, rank=r, world_size=2) for r in (0, 1)]
    assert all(np.array_equal(a, b) for a, b in zip(one_rank, two_ranks))
    assert np.array_equal(np.concatenate(two_ranks), stream.indices(8, 6))  # the step's global batch
    assert micro_batch_index(2, 1, 4) == 9
    with pytest.raises(ValueError, match="rank must lie"):
        micro_batch_index(0, 2, 2)


def test_derived_seeds_are_distinct_and_reproducible():
    seeds = {derive_seed(42, step, m) for step in range(20) for m in range(8)}
    assert len(seeds) == 160 and all(0 <= s < 2**63 for s in seeds)
    a = torch.rand(3, generator=seeded_generator(1, 2))
    assert torch.equal(a, torch.rand(3, generator=seeded_generator(1, 2)))
    with pytest.raises(ValueError, match="keys"):
        derive_seed(-1)


def test_ema_warmup_follows_the_capped_rule_and_is_off_by_default():
    from soflow_core.train import ema_warmup_coefficient

    assert [ema_warmup_coefficient(0.9999, u) for u in (0, 80, 890)] == [0.1, 0.9, 0.99]
    assert ema_warmup_coefficient(0.5, 1000) == 0.5  # the decay caps it once reached
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    plain, warm = EMA(net, decay=0.9999), EMA(net, decay=0.9999, warmup=True)
    with torch.no_grad():
        net.weight.fill_(1.0)
    plain.update(net, step=0)
    warm.update(net, step=0)
    assert plain.params["weight"].item() == pytest.approx(1e-4)  # the paper's rule: still the initial weights
    assert warm.params["weight"].item() == pytest.approx(0.9)  # kept weight 0.1 at the first update
    every = EMA(net, decay=0.9999, every=4, warmup=True)
    every.params["weight"].zero_()
    every.update(net, step=8)  # the third update (u = 8 // 4 = 2): kept weight 3/12
    assert every.params["weight"].item() == pytest.approx(0.75)
    with pytest.raises(TypeError, match="warmup"):
        EMA(net, warmup=1)

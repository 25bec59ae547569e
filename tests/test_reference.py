"""The released MLR-SNet meta-learners, imported into the canonical cell, reproduce a direct
evaluation of the reference layouts (written here from docs/design.md section 3, not from raymeta)."""

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from raymeta.errors import DataNotFoundError
from raymeta.schedules.reference import REFERENCE_DIR, load_reference, to_canonical

LOSSES = torch.tensor([2.30, 2.1, 1.7, 1.2, 0.9, 0.7, 0.5, 0.45, 0.3, 0.2, 0.25, 0.1])


def direct(sd, losses, order, forget_offset):
    """Evaluate a reference state dict as published: gates = i2h(x) + h2h(h) split into four
    blocks in ``order``; out = sigmoid(layer3(h))."""

    def mlp(prefix, x):
        h = torch.relu(x @ sd[f"{prefix}.0.weight"].T + sd[f"{prefix}.0.bias"])
        return h @ sd[f"{prefix}.2.weight"].T + sd[f"{prefix}.2.bias"]

    hidden = sd["layer3.weight"].shape[1]
    h, c, out = torch.zeros(1, hidden), torch.zeros(1, hidden), []
    for loss in losses:
        gates = mlp("layer1.fc_i2h", loss.reshape(1, 1)) + mlp("layer1.fc_h2h", h)
        blocks = dict(zip(order, gates.split(hidden, dim=1), strict=True))
        i, f = torch.sigmoid(blocks["i"]), torch.sigmoid(blocks["f"] + forget_offset)
        o, g = torch.sigmoid(blocks["o"]), torch.tanh(blocks["g"])
        c = f * c + i * g
        h = o * torch.tanh(c)
        out.append(torch.sigmoid(h @ sd["layer3.weight"].T + sd["layer3.bias"]).reshape(()))
    return torch.stack(out)


def test_released_checkpoints_match_direct_meta_test_evaluation():
    bundle = load_reference()
    assert bundle.checkpoint_epochs == [1, 100, 200]
    assert sum(p.numel() for p in bundle.cells[0].parameters()) == 11776
    for k, epoch in enumerate((1, 100, 200)):
        raw = torch.load(
            REFERENCE_DIR / f"mlr_snet_{epoch}.pth", map_location="cpu", weights_only=True
        )
        expected = direct(raw, LOSSES, "ifgo", 0.0)
        got = bundle(LOSSES, checkpoint=k)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # the checkpoints differ: a wrong mapping would not be caught by identical cells
    assert not torch.allclose(bundle(LOSSES, 0), bundle(LOSSES, 2))


def test_meta_train_layout_is_permuted_and_offset_folded():
    torch.manual_seed(0)
    raw = torch.load(REFERENCE_DIR / "mlr_snet_100.pth", map_location="cpu", weights_only=True)
    raw = {k: v + 0.3 * torch.randn_like(v) for k, v in raw.items()}
    expected = direct(raw, LOSSES, "ifog", -1.0)
    from raymeta.schedules import MLRSNet

    cell = MLRSNet()
    cell.load_state_dict(to_canonical(raw, "meta-train"))
    state, got = cell.initial_state(), []
    for loss in LOSSES:
        unit, state = cell(loss, state)
        got.append(unit)
    torch.testing.assert_close(torch.stack(got), expected, rtol=1e-6, atol=1e-6)
    # reading it with the wrong layout gives different outputs
    assert not torch.allclose(direct(raw, LOSSES, "ifgo", 0.0), expected, atol=1e-3)


def test_checkpoints_ship_with_their_notice_and_a_folder_overrides_them(tmp_path):
    """The released files are package data (checksums as in NOTICE); ``directory`` reads
    another copy, and a missing file is a one-line error naming it."""
    notice = (REFERENCE_DIR / "NOTICE").read_text()
    assert "MIT License" in notice and "github.com/xjtushujun/MLR-SNet" in notice
    for epoch in (1, 100, 200):
        data = (REFERENCE_DIR / f"mlr_snet_{epoch}.pth").read_bytes()
        assert len(data) == 49_000
        assert f"{hashlib.sha256(data).hexdigest()}  mlr_snet_{epoch}.pth" in notice
    for epoch in (1, 100):
        shutil.copy(Path(str(REFERENCE_DIR)) / f"mlr_snet_{epoch}.pth", tmp_path)
    shutil.copy(Path(str(REFERENCE_DIR)) / "mlr_snet_1.pth", tmp_path / "mlr_snet_200.pth")
    copy = load_reference(str(tmp_path))
    packaged = load_reference()
    assert torch.equal(copy(LOSSES, 1), packaged(LOSSES, 1))
    assert torch.equal(copy(LOSSES, 2), packaged(LOSSES, 0))  # epoch-1 file under the 200 name
    (tmp_path / "mlr_snet_100.pth").unlink()
    with pytest.raises(DataNotFoundError, match=r"mlr_snet_100\.pth not found") as err:
        load_reference(tmp_path)
    assert "\n" not in str(err.value)

import pytest
import torch

from psr.models.positions import fit_to_area, grid_ids, reference_ids


def test_grid_ids_match_diffusers_layout():
    from diffusers import FluxKontextPipeline

    ours = grid_ids(3, 5)
    theirs = FluxKontextPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("n", range(7))
@pytest.mark.parametrize("scheme", ["framewise", "kontext", "uno"])
def test_reference_ids_for_n_references(n, scheme):
    target = (4, 6)
    refs = [(2 + k % 2, 3) for k in range(n)]
    ids = reference_ids(target, refs, scheme)
    assert ids.shape == (sum(h * w for h, w in refs), 3)
    start, row_off, col_off = 0, target[0], target[1]
    for k, (h, w) in enumerate(refs, start=1):
        block = ids[start : start + h * w]
        start += h * w
        if scheme == "framewise":
            expected = grid_ids(h, w, index=k)
        elif scheme == "kontext":
            expected = grid_ids(h, w, index=1)
        else:
            expected = grid_ids(h, w, index=0, row_offset=row_off, col_offset=col_off)
            row_off, col_off = row_off + h, col_off + w
        assert torch.equal(block, expected), (scheme, k)


def test_framewise_references_of_different_sizes():
    ids = reference_ids((4, 4), [(2, 3), (4, 1)], "framewise")
    first, second = ids[:6], ids[6:]
    assert set(first[:, 0].tolist()) == {1.0} and set(second[:, 0].tolist()) == {2.0}
    assert first[:, 1].max() == 1 and first[:, 2].max() == 2
    assert second[:, 1].max() == 3 and second[:, 2].max() == 0


def test_uno_offsets_are_cumulative_and_diagonal():
    ids = reference_ids((2, 2), [(1, 1), (3, 2)], "uno")
    assert ids[0].tolist() == [0.0, 2.0, 2.0]
    assert ids[1].tolist() == [0.0, 3.0, 3.0]  # second image starts after target + first
    assert (ids[:, 0] == 0).all()


def test_unknown_scheme_names_config_key():
    with pytest.raises(ValueError, match="model.position_scheme"):
        reference_ids((2, 2), [(1, 1)], "diagonal")


@pytest.mark.parametrize(
    ("h", "w", "area", "expected"),
    [
        (64, 64, 64 * 64, (64, 64)),
        (100, 50, 64 * 64, (80, 32)),
        (512, 1024, 128 * 128, (80, 176)),
        (10, 10, 16, (16, 16)),
    ],
)
def test_fit_to_area_rule(h, w, area, expected):
    got = fit_to_area(h, w, area, 16)
    assert got == expected
    assert got[0] % 16 == 0 and got[1] % 16 == 0
    # closed form: round(sqrt(area * aspect)) floored to the multiple
    aspect = w / h
    assert got[1] == max(16, round((area * aspect) ** 0.5) // 16 * 16)

import pytest
import torch

import asaf_fx.triton_kernels.ops  # noqa: F401  registers torch.ops.asaf_fx.hadamard_rotate
from asaf_fx.passes.rotate.rotations import online_rotation, random_orthogonal, residual_rotation


@pytest.mark.parametrize("n", [1, 48, 80, 96, 576, 1536, 150])
@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
def test_residual_rotation_is_orthogonal_for_any_width(n, kind):
    q = residual_rotation(n, seed=0, kind=kind).matrix()
    assert q.dtype == torch.float64 and q.shape == (n, n)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)


def test_seeded_and_deterministic():
    assert torch.equal(residual_rotation(96, 3).matrix(), residual_rotation(96, 3).matrix())
    assert not torch.equal(residual_rotation(96, 3).matrix(), residual_rotation(96, 4).matrix())
    assert not torch.equal(random_orthogonal(9, 0, "a"), random_orthogonal(9, 0, "b"))


def test_hadamard_residual_rotation_spreads_outliers():
    # A one-hot (outlier) row becomes flat: every entry has magnitude 1/sqrt(n) for n = 2^k.
    q = residual_rotation(64, seed=0).matrix()
    torch.testing.assert_close(q[5].abs(), torch.full((64,), 64 ** -0.5, dtype=torch.float64))


@pytest.mark.parametrize("n", [48, 80, 160, 576])
def test_online_op_equals_dense_matrix(n):
    rotation = online_rotation(n, seed=0, tag="t")
    x = torch.randn(3, 5, n, dtype=torch.float64)
    torch.testing.assert_close(torch.ops.asaf_fx.hadamard_rotate(x, rotation.right), x @ rotation.matrix())
    torch.testing.assert_close(rotation.apply(x), x @ rotation.matrix())
    torch.testing.assert_close(rotation.apply_left_transposed(x[0].T), rotation.matrix().T @ x[0].T)


def test_unknown_kind():
    with pytest.raises(ValueError, match="rotation kind 'givens'"):
        residual_rotation(8, 0, "givens")

"""The replay's stale-micro-batch remedies (recipes/staleness_remedies.py) on hand-made gradients."""

import torch
from torch import nn

from recipes.staleness_remedies import DropStale, ErrorFeedback, make_remedy


def _window(remedy, param, grads: list[tuple[torch.Tensor, bool]]) -> torch.Tensor:
    """Accumulate (gradient, stale) backwards into param.grad as autograd would, then the step's hook."""
    param.grad = None
    for g, stale in grads:
        remedy.before_backward()
        param.grad = g.clone() if param.grad is None else param.grad + g
        remedy.after_backward(stale=stale)
    remedy.before_step()
    return param.grad.clone()


def test_error_feedback_feeds_back_the_stale_error_against_the_fresh_mean():
    p = nn.Parameter(torch.zeros(3))
    ef = ErrorFeedback([p])
    s1, f1 = torch.tensor([1.0, 0, 0]), [torch.tensor([0, 2.0, 0]), torch.tensor([0, 4.0, 0])]
    g1 = _window(ef, p, [(s1, True), (f1[0], False), (f1[1], False)])
    torch.testing.assert_close(g1, s1 + f1[0] + f1[1])  # e_0 = 0
    e1 = (f1[0] + f1[1]) / 2 - s1
    torch.testing.assert_close(ef.error[0], e1)
    s2, f2 = torch.tensor([0, 0, 5.0]), [torch.tensor([1.0, 1, 1]), torch.tensor([3.0, 3, 3])]
    g2 = _window(ef, p, [(s2, True), (f2[0], False), (f2[1], False)])
    torch.testing.assert_close(g2, s2 + f2[0] + f2[1] + e1)
    # a window without a stale micro-batch (the first after a drain) applies e and clears it
    g3 = _window(ef, p, [(torch.ones(3), False)])
    torch.testing.assert_close(g3, torch.ones(3) + (f2[0] + f2[1]) / 2 - s2)
    assert ef.error[0] is None


def test_error_feedback_in_place_form_needs_only_the_one_buffer():
    """The docstring's in-place recipe (no copy of S_t) gives the same g_t and e_{t+1}."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(5))
    ef, e, k = ErrorFeedback([p]), torch.zeros(5), 3
    for _ in range(4):
        grads = [(torch.randn(5), True)] + [(torch.randn(5), False) for _ in range(k)]
        expected = _window(ef, p, grads)
        grad = grads[0][0].clone()  # the stale backward runs first in the window
        e = -(e + (k + 1) * grad) / k
        grad = -k * (grad + e)
        for g, _ in grads[1:]:
            grad = grad + g
        e = e + grad / k
        torch.testing.assert_close(grad, expected)
        torch.testing.assert_close(e, ef.error[0])


def test_drop_stale_removes_the_stale_gradient_and_reweights_the_fresh():
    p = nn.Parameter(torch.zeros(2))
    drop = DropStale([p])
    g = _window(drop, p, [(torch.tensor([9.0, 9]), True), (torch.tensor([1.0, 2]), False),
                          (torch.tensor([3.0, 0]), False), (torch.tensor([2.0, 1]), False)])
    torch.testing.assert_close(g, torch.tensor([6.0, 3.0]) * 4 / 3)
    g = _window(drop, p, [(torch.tensor([1.0, 2]), False)])  # nothing stale: unchanged
    torch.testing.assert_close(g, torch.tensor([1.0, 2]))


def test_unknown_remedy_names_the_choices():
    assert make_remedy(None, []) is None
    try:
        make_remedy("momentum", [])
    except ValueError as error:
        assert "error_feedback" in str(error) and "drop_stale" in str(error)
    else:
        raise AssertionError("an unknown remedy name was accepted")

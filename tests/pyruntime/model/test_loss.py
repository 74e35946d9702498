"""MaskedLoss: the mean over the step's counted targets, whatever the micro-batch / dp split
(the trainer averages micro-batch losses, so each is scaled by averaged / counted)."""
import torch
import torch.nn.functional as F

from pyruntime.model.loss import MaskedLoss, lm_loss


def test_masked_mean_is_split_invariant_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, 11, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (8, 5), generator=g)
    targets[torch.rand(8, 5, generator=g) < 0.6] = -1  # uneven counts per row
    counts = targets >= 0
    want = F.cross_entropy(logits[counts], targets[counts])  # the global mean over counted targets
    (want_grad,) = torch.autograd.grad(want, logits)
    loss = MaskedLoss(lm_loss)
    for pieces in (1, 2, 4, 8):  # micro-batches x dp ranks the trainer averages over
        loss.set_step(int(counts.sum()), pieces)
        parts = [loss(lx, ly) for lx, ly in zip(logits.split(8 // pieces), targets.split(8 // pieces))]
        got = torch.stack(parts).mean()
        (grad,) = torch.autograd.grad(got, logits)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(grad, want_grad)


def test_without_a_mask_the_loss_is_unchanged():
    logits, targets = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    loss = MaskedLoss(lm_loss)
    loss.set_step(None, 4)
    assert torch.equal(loss(logits, targets), lm_loss(logits, targets))

"""hooked_gpt2.losses: the one next-token loss, against a hand computation."""

import math

import torch

from hooked_gpt2 import GPT2Config, HookedGPT2
from hooked_gpt2.losses import IGNORE, next_token_loss


def slow_losses(logits, tokens):
    """-log softmax(logits[b, i])[tokens[b, i + 1]] for every position with a target."""
    out = []
    for b in range(logits.shape[0]):
        row = []
        for i in range(min(logits.shape[1], tokens.shape[1] - 1)):
            z = logits[b, i].double()
            row.append(float(torch.logsumexp(z, 0) - z[tokens[b, i + 1]]))
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def test_next_token_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    logits, tokens = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 6))
    expected = slow_losses(logits, tokens)  # tokens one longer: every logit has a target
    assert torch.allclose(next_token_loss(logits, tokens, per_token=True).double(), expected, atol=1e-6)
    assert math.isclose(next_token_loss(logits, tokens).item(), expected.mean().item(), abs_tol=1e-6)
    # The model's own input: the last logit has no target and is left out.
    same_length = tokens[:, :5]
    assert next_token_loss(logits, same_length, per_token=True).shape == (2, 4)
    assert torch.allclose(next_token_loss(logits, same_length, per_token=True).double(), expected[:, :4], atol=1e-6)
    # bf16 logits are computed in float32.
    assert next_token_loss(logits.bfloat16(), tokens).dtype == torch.float32


def test_labels_with_ignored_positions_average_over_the_rest():
    torch.manual_seed(0)
    logits, tokens = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 6))
    expected = slow_losses(logits, tokens)
    keep = torch.tensor([[0, 0, 1, 1, 1], [1, 0, 0, 0, 1]], dtype=torch.bool)
    labels = tokens[:, 1:].masked_fill(~keep, IGNORE)
    assert math.isclose(next_token_loss(logits, labels=labels).item(), expected[keep].mean().item(), abs_tol=1e-6)
    per_token = next_token_loss(logits, labels=labels, per_token=True).double()
    assert torch.allclose(per_token, torch.where(keep, expected, 0.0), atol=1e-6)
    # Nothing ignored: the labels form is the tokens form.
    assert math.isclose(next_token_loss(logits, labels=tokens[:, 1:]).item(), next_token_loss(logits, tokens).item())


def test_model_loss_is_the_shared_loss():
    torch.manual_seed(0)
    model = HookedGPT2(GPT2Config.preset("tiny", d_model=32, n_layers=1, n_heads=2, n_ctx=16, d_vocab=50)).eval()
    tokens = torch.randint(0, 50, (3, 9))
    with torch.no_grad():
        per_token = model.loss(tokens, per_token=True)
        assert per_token.shape == (3, 8)
        assert torch.allclose(per_token.double(), slow_losses(model(tokens[:, :-1]), tokens), atol=1e-5)
        assert torch.allclose(model.loss(tokens), per_token.mean())

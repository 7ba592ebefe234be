"""Issue 2: top-1/top-5 of every branch and TA, weighted by samples (not a mean of per-batch accuracies)."""
import pytest
import torch

from ahbf.evaluation import evaluate, format_table, topk_correct


def test_topk_counts_by_hand():
    z = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0.0, 1, 2, 3, 4, 5]])  # sample 0 ranks class 0 first; sample 1 class 5
    y = torch.tensor([0, 0])
    assert topk_correct([z, z.flip(1)], y).tolist() == [[1, 1], [1, 1]]
    assert topk_correct([z], torch.tensor([4, 1])).tolist() == [[0, 2]]  # both in the top 5, neither first
    assert topk_correct([z[:, :3]], torch.tensor([2, 2])).tolist() == [[1, 2]]  # K < 5: top-k is all K


def test_accuracy_is_weighted_by_samples_not_by_batches():
    # batch 1: 4 samples, branch right on all; batch 2: 1 sample, branch wrong. Per-batch mean = 50%, true = 80%.
    K = 3
    batches = [(torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 2, 0])), (torch.tensor([1]), torch.tensor([2]))]

    def predict(x):  # branch "a" predicts x; branch "b" always predicts class 0
        return [torch.nn.functional.one_hot(x, K).float(), torch.nn.functional.one_hot(torch.zeros_like(x), K).float()]

    m = evaluate(predict, batches, ["branch0", "ta0"])
    assert m["branch0"]["top1"] == pytest.approx(80.0)
    assert m["ta0"]["top1"] == pytest.approx(40.0)  # 2 of 5 labels are 0
    assert m["branch0"]["top5"] == pytest.approx(100.0)
    assert m["_samples"]["n"] == 5
    assert "branch0 (target)" in format_table(m) and "(5 samples)" in format_table(m)


def test_reduce_sums_counts_across_ranks():
    batches = [(torch.tensor([0, 1]), torch.tensor([0, 0]))]
    m = evaluate(lambda x: [torch.nn.functional.one_hot(x, 2).float()], batches, ["branch0"],
                 reduce=lambda t: t * 2)  # two identical "ranks"
    assert m["_samples"]["n"] == 4 and m["branch0"]["top1"] == pytest.approx(50.0)


def test_empty_split_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        evaluate(lambda x: [x], [], ["branch0"])


def test_an_empty_shard_still_joins_the_reduction():
    """Under DDP a rank with no evaluation batches must still all-reduce (with zeros), or the others hang."""
    seen = []

    def reduce(t):  # the other rank: 1 top-1 hit, 2 top-5 hits, 2 samples
        seen.append(t.clone())
        return t + torch.tensor([1.0, 2.0, 3.0, 2.0], dtype=t.dtype)  # ... and a loss sum of 3

    m = evaluate(lambda x: [x], [], ["branch0"], reduce=reduce)
    assert seen and seen[0].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert m["branch0"] == {"top1": 50.0, "top5": 100.0, "loss": 1.5} and m["_samples"]["n"] == 2


def test_loss_is_the_sample_weighted_cross_entropy():
    torch.manual_seed(0)
    z, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 5, (7,))
    batches = [(z[:4], y[:4]), (z[4:], y[4:])]
    m = evaluate(lambda x: [x, 2 * x], batches, ["branch0", "ta0"])
    assert m["branch0"]["loss"] == pytest.approx(torch.nn.functional.cross_entropy(z, y).item(), rel=1e-6)
    assert m["ta0"]["loss"] == pytest.approx(torch.nn.functional.cross_entropy(2 * z, y).item(), rel=1e-6)

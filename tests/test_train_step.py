"""The one training step (loldu_sd.training.step) on a small seeded model: accumulation, hooks, checks, savers.

train_dreambooth runs it on an Accelerator (tests/test_train.py: resume, 2 processes, accumulation); here it runs on
OneProcess, as the quality benchmark does.
"""
import pytest
import torch
from torch import nn

from loldu_sd.training.step import NonFiniteStep, OneProcess, Trainable, training_step


def setup(seed=0, lr=0.1):
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)  # halves each step
    batches = [torch.randn(2, 3, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    return model, optimizer, schedule, batches


def loss_of(model):
    return lambda x: model(x).pow(2).mean()


def test_two_accumulated_micro_batches_are_one_step_on_their_concatenation():
    model_a, opt_a, sched_a, batches = setup()
    seen = []
    trainable = Trainable(list(model_a.parameters()), {"m": model_a}, [seen.append])
    loss = training_step(trainable, OneProcess(2), iter(batches[:2]), loss_of(model_a), opt_a, sched_a, 0.0)

    model_b, opt_b, sched_b, _ = setup()
    whole = training_step(Trainable(list(model_b.parameters()), {"m": model_b}), OneProcess(1),
                          iter([torch.cat(batches[:2])]), loss_of(model_b), opt_b, sched_b, 0.0)
    assert loss == pytest.approx(whole, rel=1e-6)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert seen == [0.1] and opt_a.param_groups[0]["lr"] == 0.05  # hooks get the step's lr; then the schedule


def test_clipping_hooks_and_savers(tmp_path):
    model, optimizer, schedule, batches = setup(lr=1.0)
    before = model.weight.detach().clone()
    trainable = Trainable([model.weight], {"m": model}, [lambda lr: model.weight.data.clamp_(-0.5, 0.5)],
                          [lambda folder: _save(folder, model)])
    training_step(trainable, OneProcess(), iter(batches[:1]), loss_of(model), optimizer, schedule, 1e-3)
    assert not torch.equal(model.weight, before) and model.weight.abs().max() <= 0.5
    assert trainable.save(tmp_path / "files") == (tmp_path / "files" / "w.pt").stat().st_size > 0
    merged = trainable.merge(Trainable([model.bias], {"n": model}))
    assert merged.params == [model.weight, model.bias] and set(merged.trained) == {"m", "n"}


def _save(folder, model):
    torch.save(model.weight.detach(), folder / "w.pt")
    return folder / "w.pt"


def test_a_non_finite_loss_or_a_failed_check_stops_the_step():
    model, optimizer, schedule, batches = setup()
    trainable = Trainable(list(model.parameters()), {"m": model})
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteStep, match="^the loss is nan$"):
        training_step(trainable, OneProcess(), iter(batches[:1]), lambda x: loss_of(model)(x) * float("nan"),
                      optimizer, schedule, 1.0)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # nothing stepped
    trainable.checks.append(lambda: "layer m is too large")
    with pytest.raises(NonFiniteStep, match="^after the optimizer step, layer m is too large$"):
        training_step(trainable, OneProcess(), iter(batches[:1]), loss_of(model), optimizer, schedule, 1.0)

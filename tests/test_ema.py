"""train.ema_decay: the moving average of the weights, what it holds, where it is used, resume."""

import pytest
import torch

import everyseg.engine.train as train_module
from everyseg.engine.checkpoint import load_checkpoint
from everyseg.engine.ema import WeightAverage
from everyseg.engine.load import load_run
from everyseg.engine.run_dir import RunDir
from everyseg.engine.train import train


def test_average_follows_the_warm_up_decay_and_copies_counters():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    average = WeightAverage(model, decay=0.9)
    expected = model[0].weight.detach().clone()
    for n in range(1, 4):
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model[1].num_batches_tracked += 1
        average.update(model)
        decay = min(0.9, (1 + n) / (10 + n))  # 0.18, 0.25, 0.31: the start is not dominant
        expected = decay * expected + (1 - decay) * model[0].weight.detach()
    assert torch.allclose(average.weights["0.weight"], expected)
    assert average.weights["1.num_batches_tracked"] == 3  # an integer is copied, not averaged


def test_in_place_of_gives_the_model_its_own_weights_back():
    model = torch.nn.Linear(3, 1)
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model.weight.mul_(3.0)
    own = model.weight.detach().clone()
    with average.in_place_of(model) as averaged:
        assert torch.equal(averaged.weight, average.weights["weight"])
        assert not torch.equal(averaged.weight, own)
    assert torch.equal(model.weight, own)


def test_a_run_predicts_with_its_average_and_resumes_it_exactly(make_config, tmp_path, monkeypatch):
    n = 2
    sets = [f"train.steps={2 * n}", f"train.checkpoint_every={n}", "train.ema_decay=0.5"]
    cfg = make_config(*sets)
    # evaluating during training swaps the average in and the trained weights back
    evaluated = make_config(*sets, f"train.eval_every={n}")
    straight = RunDir(train(evaluated, out_dir=tmp_path / "a", progress=False).root)
    assert load_checkpoint(straight.best)["ema"]["updates"] in (n, 2 * n)
    last = load_checkpoint(straight.last)
    average, trained = last["ema"]["weights"], last["model"]
    assert last["ema"]["updates"] == 2 * n
    moved = [k for k in trained if trained[k].is_floating_point()]
    assert any(not torch.equal(average[k], trained[k]) for k in moved)
    # model.pt (what is shared), load_run (evaluate, predict, export): the average
    exported = load_checkpoint(straight.model)["model"]
    assert all(torch.equal(exported[k], average[k]) for k in average)
    loaded = load_run(straight.root, checkpoint="last", device="cpu").model
    head = "roi_heads.box_predictor.cls_score.weight"
    assert torch.equal(loaded.state_dict()[head], average[head])

    real_step = train_module.train_one_step

    def interrupted(*args, step, **kwargs):
        if step == n:
            raise KeyboardInterrupt  # dies after the step-n checkpoint
        return real_step(*args, step=step, **kwargs)

    monkeypatch.setattr(train_module, "train_one_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out_dir=tmp_path / "b", progress=False)
    monkeypatch.undo()
    resumed = load_checkpoint(train(cfg, out_dir=tmp_path / "b", resume=True, progress=False).last)
    assert resumed["ema"]["updates"] == 2 * n
    assert all(torch.equal(resumed["ema"]["weights"][k], average[k]) for k in average)
    assert all(torch.equal(resumed["model"][k], trained[k]) for k in trained)


def test_a_run_without_it_keeps_no_average(trained_run):
    assert "ema" not in load_checkpoint(trained_run.last)

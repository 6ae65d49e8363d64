"""The hesscale command: reproduce the paper's figures, train and tune optimizers.

hesscale reproduce            Fig. 1 (approximation quality), then Fig. 2 (cost)
hesscale reproduce fig1 [--out DIR] [--seeds N] [--examples N]
                        [--architecture mlp|residual|gated|cnn|resnet|lm|transformer|gpt|
                                        convnext|efficientnet|swin|lstm]
                        [--trained STEPS]
hesscale reproduce fig2 [--out DIR] [--full] [--batch-size B] [--loss mse|ce]
                        [--include-forward] [--rounds R] [--device cpu|cuda]
hesscale train --problem P --optimizer O --lr LR [...]   one run on a DeepOBS problem
hesscale tune --problem P [--optimizers ...] [--budget default|paper|tiny]
hesscale importance oracle|pruning|continual|all [--out DIR] [...]   Section 7's uses
"""

from __future__ import annotations

import argparse
import sys


def _fig1(args) -> None:
    from .experiments import fig1

    default = "results/fig1" if args.architecture == "mlp" else f"results/fig1-{args.architecture}"
    out = args.out or (default + (f"-trained{args.trained}" if args.trained else ""))
    summary = fig1.run(
        out,
        seeds=args.seeds,
        examples=args.examples,
        architecture=args.architecture,
        trained=args.trained,
    )
    regime = f"after {args.trained} steps of Adam" if args.trained else "at initialisation"
    print(
        f"\nFig. 1 ({args.architecture}, {regime}): mean L1 error over {args.seeds} "
        "initialisations, relative to HesScale"
    )
    print(fig1.table(summary))
    print(f"written: {out}/fig1.json, fig1a.png, fig1b.png")


def _fig2(args) -> None:
    from .experiments import fig2

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is available on this machine")
    summary = fig2.run(
        args.out or "results/fig2",
        full=args.full,
        batch=args.batch_size,
        loss=args.loss,
        include_forward=args.include_forward,
        rounds=args.rounds,
        device=args.device,
    )
    print("\nFig. 2: time of one update step relative to Adam's")
    print(fig2.table(summary))
    print(f"written: {args.out or 'results/fig2'}/fig2.json, fig2a.png, fig2b.png")


def _train(args) -> None:
    from .experiments.train import RunConfig, train

    config = RunConfig(
        problem=args.problem,
        optimizer=args.optimizer,
        lr=args.lr,
        betas=tuple(args.betas),
        eps=args.eps,
        weight_decay=args.weight_decay,
        epochs=args.epochs,
        seed=args.seed,
        padding=args.padding,
        max_batches=args.max_batches,
        text_file=args.text_file,
        accumulate=args.accumulate,
    )
    record = train(
        config,
        args.out,
        data_dir=args.data_dir,
        download=args.download,
        device=args.device,
        fsdp=args.fsdp,
    )
    curves = record["curves"]
    print(
        f"{config.name()}: {record['status']} after {len(curves['epoch']) - 1} epochs, "
        f"padding {record['padding']}; test loss {curves['test_loss'][-1]:.4f}, "
        f"test accuracy {curves['test_acc'][-1]:.4f}, {record['seconds_per_epoch']:.1f} s/epoch"
    )
    print(f"written: {args.out}/{config.name()}.json")


def _tune(args) -> None:
    from .experiments.tune import report, tune

    summary = tune(
        args.problem,
        args.optimizers,
        budget=args.budget,
        out=args.out,
        padding=args.padding,
        data_dir=args.data_dir,
        download=args.download,
        device=args.device,
        eps=args.eps,
        text_file=args.text_file,
    )
    print(report(summary))
    print(
        f"written: {summary['directory']}/summary.json, curves_epochs.png, "
        "curves_time.png, sensitivity.png"
    )


def _importance(args) -> None:
    from .experiments import continual, oracle, pruning_study

    data = {"data_dir": args.data_dir, "download": args.download}
    base = args.out or "results"
    networks = args.networks_dir or f"{base}/networks"
    if args.study in ("oracle", "all"):
        summary = oracle.run(
            f"{base}/oracle",
            seeds=args.seeds,
            weights=args.weights,
            examples=args.examples,
            networks_dir=networks,
            **data,
        )
        print(
            "\nOracle agreement: Spearman ρ of each score with the true effect of removing a "
            "weight (mean ± s.e.)"
        )
        print(oracle.table(summary))
        print(f"written: {base}/oracle/oracle.json, oracle.png")
    if args.study in ("pruning", "all"):
        summary = pruning_study.run(
            f"{base}/pruning",
            score_batches=args.score_batches,
            finetune_steps=args.finetune_steps,
            networks_dir=networks,
            **data,
        )
        print(
            "\nOne-shot global pruning: test accuracy after pruning → after fine-tuning "
            "(score s: seconds to compute the scores)"
        )
        print(pruning_study.table(summary))
        print(f"written: {base}/pruning/pruning.json, pruning.png")
    if args.study in ("continual", "all"):
        summary = continual.run(
            f"{base}/continual",
            tasks=args.tasks,
            steps_per_task=args.steps_per_task,
            seeds=args.cl_seeds,
            **data,
        )
        print("\nPermuted Fashion-MNIST: mean test accuracy over all tasks after the last one")
        print(continual.table(summary))
        print(f"written: {base}/continual/continual.json, continual.png")


class _DefaultsShown(argparse.HelpFormatter):
    """Help that states each option's default, unless the help says it or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or action.default is None or action.default is False:
            return text
        if "default" in text:
            return text
        if action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--padding",
        choices=["valid", "same"],
        default="valid",
        help="valid: the paper authors' networks (default); same: DeepOBS'",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="data directory (default $HESSCALE_DATA or ~/.cache/hesscale/data)",
    )
    parser.add_argument(
        "--download", action="store_true", help="download missing data files (checksums verified)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--text-file",
        default=None,
        help="text problems: train on this UTF-8 text file instead of Shakespeare's plays",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hesscale",
        description="Hessian-diagonal estimates at about the cost of a gradient: reproduce the "
        "paper's figures (reproduce), train one configuration on a DeepOBS problem (train), or "
        "run the paper's step-size search with selection and reruns (tune).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = _DefaultsShown
    reproduce = commands.add_parser(
        "reproduce", help="reproduce a figure of the paper", formatter_class=defaults
    )
    reproduce.add_argument("figure", nargs="?", choices=["fig1", "fig2", "all"], default="all")
    reproduce.add_argument("--out", default=None, help="output directory (default results/FIG)")
    group1 = reproduce.add_argument_group("fig1")
    group1.add_argument("--seeds", type=int, default=40, help="initialisations (default 40)")
    group1.add_argument("--examples", type=int, default=1000, help="examples per initialisation")
    group1.add_argument(
        "--architecture",
        default="mlp",
        choices=[
            "mlp",
            "residual",
            "gated",
            "cnn",
            "resnet",
            "lm",
            "transformer",
            "gpt",
            "convnext",
            "efficientnet",
            "swin",
            "lstm",
        ],
        help="the paper's MLP (default) or a graph of about the same size: residual MLP, gated "
        "(SwiGLU) MLP, residual CNN, ResNet with train-mode BatchNorm (each example a batch of "
        "8), tiny LM with tied embeddings, pre-LN transformer encoder layer, one-block GPT; or a "
        "zoo architecture at reduced width (torchvision's ConvNeXt, EfficientNet, Swin; an LSTM)",
    )
    group1.add_argument(
        "--trained",
        type=int,
        default=0,
        metavar="STEPS",
        help="measure after STEPS steps of full-batch Adam on a teacher network's labels "
        "(default 0: at initialisation, the paper's protocol)",
    )
    group2 = reproduce.add_argument_group("fig2")
    group2.add_argument("--full", action="store_true", help="panel (b) up to 128 hidden layers")
    group2.add_argument("--batch-size", type=int, default=1, help="examples per timed update")
    group2.add_argument("--loss", choices=["mse", "ce"], default="mse", help="the loss timed")
    group2.add_argument(
        "--include-forward",
        action="store_true",
        help="time forward + backward + update instead of backward + update",
    )
    group2.add_argument("--rounds", type=int, default=30, help="timed updates per point")
    group2.add_argument("--device", default="cpu", help="cpu or cuda")

    from .experiments.problems import PROBLEMS
    from .optim import OPTIMIZERS

    train = commands.add_parser(
        "train", help="train one configuration on a DeepOBS problem", formatter_class=defaults
    )
    train.add_argument("--problem", required=True, choices=sorted(PROBLEMS), help="the problem")
    train.add_argument("--optimizer", required=True, choices=list(OPTIMIZERS), help="the optimizer")
    train.add_argument("--lr", type=float, required=True, help="step size α")
    train.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999], help="β₁ β₂ (not SGD)")
    train.add_argument("--eps", type=float, default=1e-8, help="ε of the adaptive optimizers")
    train.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="L2 penalty on weights (default: the problem's)",
    )
    train.add_argument("--epochs", type=int, default=2, help="training epochs")
    train.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    train.add_argument(
        "--accumulate",
        type=int,
        default=1,
        help="micro-batches per step (gradient accumulation: the step of the whole batch)",
    )
    train.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard the model over the processes with FSDP2 (fully_shard) "
        "instead of replicating it with DistributedDataParallel",
    )
    train.add_argument("--max-batches", type=int, default=None, help=argparse.SUPPRESS)
    train.add_argument(
        "--out", default="results/train", help="folder of the run record and checkpoint"
    )
    _data_arguments(train)

    tune = commands.add_parser(
        "tune", help="the paper's grid search, selection and reruns", formatter_class=defaults
    )
    tune.add_argument("--problem", required=True, choices=sorted(PROBLEMS), help="the problem")
    tune.add_argument(
        "--optimizers",
        nargs="+",
        default=list(OPTIMIZERS),
        choices=list(OPTIMIZERS),
        help="optimizers to tune",
    )
    tune.add_argument(
        "--budget",
        choices=["default", "paper", "quick", "sensitivity", "tiny"],
        default="default",
        help="default: 2 epochs, 4 step sizes grown while the best is on the edge, β₁ ∈ {0, 0.9} "
        "× β₂ ∈ {0.99, 0.999, 0.9999}, the best rerun over 3 seeds; paper: the problem's full "
        "epochs, 7 step sizes, 30 seeds; quick: 2 epochs of 100 batches, 3 step sizes, β = (0.9, "
        "0.999), 1 seed; "
        "sensitivity: 2 epochs, one step size per decade over "
        "6 decades, β = (0.9, 0.999), 3 seeds (robustness to the step size); tiny: 1 epoch of "
        "3 batches, 2 step sizes, one β pair, 2 seeds (a smoke test)",
    )
    tune.add_argument("--out", default="results/tune", help="folder of the runs and the report")
    tune.add_argument(
        "--eps",
        type=float,
        default=None,
        help="ε of every adaptive optimizer (default: 1e-8); kept in <out>/<problem>_eps<ε>",
    )
    _data_arguments(tune)

    study = commands.add_parser(
        "importance",
        help="Section 7: importance scores against an oracle, pruning, continual learning",
        description="Fashion-MNIST studies of Hessian-diagonal importance: how well each score "
        "ranks the true loss change of removing a weight (oracle), one-shot pruning at 50-98% "
        "sparsity (pruning), EWC-style penalties on permuted Fashion-MNIST (continual).",
        formatter_class=defaults,
    )
    study.add_argument(
        "study",
        nargs="?",
        choices=["oracle", "pruning", "continual", "all"],
        default="all",
        help="the study to run (default: all three, about an hour on 2 CPU cores)",
    )
    study.add_argument("--out", default=None, help="parent folder (default results)")
    study.add_argument(
        "--networks-dir", default=None, help="trained networks (default OUT/networks)"
    )
    group = study.add_argument_group("oracle")
    group.add_argument("--seeds", type=int, default=3, help="trained networks per architecture")
    group.add_argument("--weights", type=int, default=1000, help="weights removed one by one")
    group.add_argument("--examples", type=int, default=250, help="evaluation batch size")
    group = study.add_argument_group("pruning")
    group.add_argument("--score-batches", type=int, default=10, help="batches of 128 scored")
    group.add_argument("--finetune-steps", type=int, default=100, help="Adam steps after pruning")
    group = study.add_argument_group("continual")
    group.add_argument("--tasks", type=int, default=5, help="permuted tasks")
    group.add_argument("--steps-per-task", type=int, default=400, help="Adam steps per task")
    group.add_argument("--cl-seeds", type=int, default=1, help="seeds of every configuration")
    study.add_argument(
        "--data-dir",
        default=None,
        help="data directory (default $HESSCALE_DATA or ~/.cache/hesscale/data)",
    )
    study.add_argument(
        "--download", action="store_true", help="download missing data files (checksums verified)"
    )
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return _train(args)
    if args.command == "tune":
        return _tune(args)
    if args.command == "importance":
        return _importance(args)
    if args.command == "reproduce":
        for figure, run in (("fig1", _fig1), ("fig2", _fig2)):
            if args.figure in (figure, "all"):
                out = args.out
                if args.figure == "all" and out is not None:
                    out = f"{out}/{figure}"
                run(argparse.Namespace(**{**vars(args), "out": out}))


if __name__ == "__main__":  # `torchrun ... -m hesscale.cli train ...`
    main()

"""A tiny training program with medgain's reliability handlers, run by tests/test_reliability.py as a process that
can be killed (-9), resumed (--resume auto), disconnected from its tracking server, or run under torchrun.

Prints ``STARTED`` when training starts, ``EPOCH <n>`` after each epoch's checkpoint, ``SAVING`` in the middle of
a checkpoint write (with ``--slow-save``), and saves the final weights to ``--out``.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.utils import CommonKeys
from torch import nn

from medgain.handlers import (
    BufferedMLFlowHandler,
    NonFiniteLossHandler,
    ResumeFromCheckpoint,
    TrainingCheckpointSaver,
    TrainingFailureHandler,
)


def batches(n: int = 6, size: int = 12) -> list[dict[str, object]]:
    """Fixed noise images with a bright square on positives; file names for error messages."""
    g = torch.Generator().manual_seed(0)
    out = []
    for b in range(n):
        images = torch.rand(4, 3, size, size, generator=g)
        labels = torch.tensor([0, 1, 0, 1])
        images[labels == 1, 0, 3:7, 3:7] += 1.0
        out.append({"image": images, "label": labels, "image_path": [f"batch{b}_img{i}.png" for i in range(4)]})
    return out


def network() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)]
    return nn.Sequential(*layers)


def train(argv: list[str]) -> None:
    """Train as the command line ``argv`` says (see the module docstring)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--uri", required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--resume", default="")
    parser.add_argument("--out", required=True)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per iteration")
    parser.add_argument("--slow-save", type=int, default=0, help="epoch whose checkpoint write pauses halfway")
    parser.add_argument("--nan-at", type=int, default=0, help="iteration whose loss is NaN")
    parser.add_argument("--raise-rank", type=int, default=-1, help="under torchrun: this rank raises at iteration 3")
    parser.add_argument("--offline-timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as the child processes (OMP_NUM_THREADS=1): bit-identical runs in or out of process
    distributed = "RANK" in os.environ
    if distributed:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if distributed else 0
    net = network()
    model = nn.parallel.DistributedDataParallel(net) if distributed else net
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)

    def loss_function(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(pred, label)
        return loss * float("nan") if trainer.state.iteration == args.nan_at else loss

    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=args.epochs, train_data_loader=batches(), network=model,
        optimizer=optimizer, loss_function=loss_function, decollate=False,
    )
    saves = {"model": net, "optimizer": optimizer}
    if rank == 0:
        tracking = BufferedMLFlowHandler(
            buffer_dir=os.path.join(args.ckpt, "tracking"), tracking_uri=args.uri, experiment_name="reliability",
            run_name="trial", output_transform=lambda out: out[CommonKeys.LOSS].item(), close_on_complete=True,
            offline_timeout=args.offline_timeout,
        )
        saves["tracking"] = tracking
        TrainingFailureHandler(tracking, args.ckpt, saves).attach(trainer)
        tracking.attach(trainer)
    NonFiniteLossHandler().attach(trainer)
    ResumeFromCheckpoint(args.resume or None, {**saves, "trainer": trainer}, save_dir=args.ckpt).attach(trainer)
    if rank == 0:
        TrainingCheckpointSaver(args.ckpt, saves).attach(trainer)

    if args.slow_save:
        real_save = torch.save

        def slow_save(obj: object, f: io.BufferedWriter) -> None:
            if trainer.state.epoch != args.slow_save or not hasattr(f, "write"):
                return real_save(obj, f)
            buffer = io.BytesIO()
            real_save(obj, buffer)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            print("SAVING", flush=True)
            time.sleep(30)
            f.write(data[len(data) // 2 :])

        torch.save = slow_save

    @trainer.on(Events.STARTED)
    def started(engine: SupervisedTrainer) -> None:
        print("STARTED", flush=True)

    @trainer.on(Events.ITERATION_COMPLETED)
    def pace(engine: SupervisedTrainer) -> None:
        if engine.state.iteration == 3 and rank == args.raise_rank:
            raise RuntimeError(f"rank {rank} failed on purpose")
        time.sleep(args.sleep)

    @trainer.on(Events.EPOCH_COMPLETED)
    def epoch_done(engine: SupervisedTrainer) -> None:
        print(f"EPOCH {engine.state.epoch}", flush=True)

    trainer.run()
    if rank == 0:
        torch.save(net.state_dict(), args.out)
    if distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    train(sys.argv[1:])

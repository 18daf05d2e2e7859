"""`python -m lit_modules.instruct_ue_speed experiment=NAME [key=value ...] [--steps N] [--profile]`: InstructUE's
training steps per second on an experiment's real data and model, without a run directory.

Builds the module and DataModule exactly as `experiments.run` does, then times N optimizer steps
(loss, backward, AdamW step) over the training loader's first batches, the first step apart (it
pays one-off costs: lazy imports, allocator warm-up). With the encoder cache on (`model.encoder_cache`,
the default) the cache is filled before the clock starts, as `on_fit_start` fills it in a run,
and the seconds that took are printed too. `--profile` prints cProfile's top functions of the
timed steps (cumulative time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lit_modules.instruct_ue_speed", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="experiment=NAME and key=value overrides, as experiments.run takes them")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps after the first")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top 25 functions of the timed steps")
    args = parser.parse_args(argv)

    import lightning.pytorch as L
    import torch
    from omegaconf import OmegaConf

    from datamodules.config import DataConfig
    from datamodules.datamodule import EventDataModule
    from experiments.build import build_datamodule, build_module
    from experiments.config import compose, to_dataclass

    cfg = compose(args.overrides)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    events = EventDataModule(to_dataclass(cfg.data, DataConfig), seed=cfg.seed)
    method = OmegaConf.to_object(cfg.model)
    module, dm = build_module(method, events.data), build_datamodule(method, events)
    module.train()
    optimizer = torch.optim.AdamW(module.param_groups(), lr=method.lr)
    warm = 0.0
    if getattr(module, "encoder_cache", None) is not None:
        start = time.perf_counter()
        module.fill_encoder_cache(dm.encoder_batches())
        warm = time.perf_counter() - start
        print(f"encoder cache filled: {len(module.encoder_cache)} distinct source texts in {warm:.1f} s")
    batches = iter(dm.train_dataloader())

    def step() -> float:
        batch = next(batches)
        t0 = time.perf_counter()
        loss = sum(module.losses(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - t0

    first = step()
    profiler = cProfile.Profile() if args.profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    compute = [step() for _ in range(args.steps)]
    if profiler:
        profiler.disable()
    total = time.perf_counter() - start
    print(
        f"first step {first:.2f} s; {args.steps} timed steps in {total:.2f} s: {args.steps / total:.3f} steps/s "
        f"(model {sum(compute):.2f} s, batches {total - sum(compute):.2f} s); batch size {cfg.data.batch_size}, "
        f"encoder cache {'on' if getattr(module, 'encoder_cache', None) is not None else 'off'}"
    )
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())

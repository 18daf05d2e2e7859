"""`python -m lit_modules.instruct_ue_speed experiment=NAME [key=value ...] [--steps N] [--profile]`: InstructUE's
training steps per second on an experiment's real data and model, with and without the encoder cache, side by side.

Builds the module and DataModule exactly as `experiments.run` does, takes the training loader's first
N + 1 batches and times optimizer steps (loss, backward, AdamW step) on them twice, interleaved in
one process so both sides see the same machine load: once with `model.encoder_cache` (the batches'
source texts already in the cache, as `on_fit_start` leaves them in a run) and once with the encoder
reading every source (the cache switched off). The first batch is a warm-up step of each side, not
timed. `--fill` also times filling the cache with every source text of the run (what a run pays once
before training; minutes with the real MiniLM). `--profile` prints cProfile's top functions of the
cached steps (cumulative time).
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
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps of each side after the warm-up")
    parser.add_argument("--fill", action="store_true", help="also time filling the cache with every source text of the run")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top 25 functions of the cached steps")
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
    cache = module.encoder_cache
    if cache is None:
        print("this configuration has no encoder cache (no modality encoder, a trained one, or model.encoder_cache=false)")
        return 1
    module.train()
    optimizer = torch.optim.AdamW(module.param_groups(), lr=method.lr)
    loader = iter(dm.train_dataloader())
    batches = [next(loader) for _ in range(args.steps + 1)]
    if args.fill:
        start = time.perf_counter()
        added = module.fill_encoder_cache(dm.encoder_batches())
        print(f"filling the cache: {added} distinct source texts in {time.perf_counter() - start:.1f} s")
    module.fill_encoder_cache((b["enc_ids"], b["enc_mask"]) for b in batches)
    module.train()

    def step(batch: dict, cached: bool) -> float:
        module.encoder_cache = cache if cached else None
        t0 = time.perf_counter()
        loss = sum(module.losses(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - t0

    step(batches[0], True), step(batches[0], False)  # warm-up of both paths
    profiler = cProfile.Profile() if args.profile else None
    seconds = {True: [], False: []}
    for batch in batches[1:]:
        for cached in (False, True):
            if profiler and cached:
                profiler.enable()
            seconds[cached].append(step(batch, cached))
            if profiler and cached:
                profiler.disable()
    module.encoder_cache = cache
    for cached in (False, True):
        total = sum(seconds[cached])
        each = ", ".join(f"{s:.2f}" for s in seconds[cached])
        print(f"encoder cache {'on ' if cached else 'off'}: {args.steps} steps in {total:.2f} s = {args.steps / total:.3f} steps/s ({each} s)")
    print(f"speed-up {sum(seconds[False]) / sum(seconds[True]):.2f}x; batch size {cfg.data.batch_size}")
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m lit_modules.instruct_ue_speed experiment=NAME [key=value ...] [--steps N] [--profile]`: InstructUE's
training steps per second on an experiment's real data and model, before and after the speed-ups, side by side.

Builds the module and DataModule exactly as `experiments.run` does, takes the training loader's first
N + 1 batches and times optimizer steps (loss, backward, AdamW step) on each batch three ways,
interleaved in one process so every side sees the same machine load:
  before: the encoder reads every source, the LM head runs at every position from the first <USER> on
          (the code before the speed-ups);
  cache:  the batches' source texts already in `model.encoder_cache` (as `on_fit_start` leaves them in
          a run), the LM head still at every position;
  after:  the cache and the LM head at answer positions only (`InstructUEJoint.answer_head`), as a run trains.
The first batch is a warm-up step of each side, not timed. `--fill` also times filling the cache with every source text of the run (what a run pays once
before training; minutes with the real MiniLM). `--profile` prints cProfile's top functions of the
`after` steps (cumulative time).
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
    parser.add_argument("--profile", action="store_true", help="print cProfile's top 25 functions of the `after` steps")
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

    head = module.answer_head()
    sides = {"before": (None, None), "cache": (cache, None), "after": (cache, head)}

    def step(batch: dict, side: str) -> float:
        module.encoder_cache, module._head = sides[side]
        t0 = time.perf_counter()
        loss = sum(module.losses(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - t0

    for side in sides:  # warm-up of every path
        step(batches[0], side)
    profiler = cProfile.Profile() if args.profile else None
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    for batch in batches[1:]:
        for side in sides:
            if profiler and side == "after":
                profiler.enable()
            seconds[side].append(step(batch, side))
            if profiler and side == "after":
                profiler.disable()
    module.encoder_cache, module._head = cache, head
    for side, times in seconds.items():
        each = ", ".join(f"{s:.2f}" for s in times)
        print(f"{side:>6}: {args.steps} steps in {sum(times):.2f} s = {args.steps / sum(times):.3f} steps/s ({each} s)")
    print(f"speed-up after/before {sum(seconds['before']) / sum(seconds['after']):.2f}x; batch size {cfg.data.batch_size}")
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())

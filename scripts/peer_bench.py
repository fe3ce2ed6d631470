"""The PyTorch peer of `sepdist bench --config configs/bench_cpu.yaml`: the training step
(forward with the multi-resolution STFT loss, backward, AdamW) of the `bs-roformer` package's
BSRoformer in the same configuration, on random audio of the same shape.

Prints one line per timed step and a final `median_step_s=... peak_rss_bytes=...` line that
scripts/compare_peer.sh parses. Run by that script; not part of CI.
"""

import argparse
import resource
import statistics
import time

import torch
from bs_roformer import BSRoformer

BANDS_62 = (2,) * 24 + (4,) * 12 + (12,) * 8 + (24,) * 8 + (48,) * 8 + (128, 129)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # configs/bench_cpu.yaml: dim 64, 2 layers of (1 time + 1 band transformer), 4 heads of
    # 16, FFN x4, mask MLP depth 2 (hidden 4 x 64 = 256), 4 stereo stems, n_fft 2048, hop 512,
    # 62 bands, default multi-resolution STFT loss, hyper-connections off.
    model = BSRoformer(
        dim=64,
        depth=2,
        stereo=True,
        num_stems=4,
        time_transformer_depth=1,
        freq_transformer_depth=1,
        freqs_per_bands=BANDS_62,
        dim_head=16,
        heads=4,
        num_residual_streams=1,
        stft_n_fft=2048,
        stft_hop_length=512,
        stft_win_length=2048,
        mask_estimator_depth=2,
    )
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8)
    batch, samples = 2, 88200
    times = []
    for step in range(args.warmup + args.steps):
        mix = torch.randn(batch, 2, samples) * 0.1
        target = torch.randn(batch, 4, 2, samples) * 0.05
        start = time.perf_counter()
        loss = model(mix, target=target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)
        print(f"step {step}: {elapsed:.3f} s, loss {loss.item():.4f}", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"params={params} threads={args.threads} median_step_s={statistics.median(times):.4f} "
        f"peak_rss_bytes={peak}"
    )


if __name__ == "__main__":
    main()

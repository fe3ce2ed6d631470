use clap::Parser;
use std::process::ExitCode;

/// Counts heap bytes for the `mem=` figures and the memory metrics.
#[global_allocator]
static HEAP: peak_alloc::PeakAlloc = peak_alloc::PeakAlloc;

/// glibc serves blocks above its mmap threshold (at most 32 MB when adjusted dynamically)
/// with fresh mappings, so every activation tensor of a training step is page-faulted and
/// zeroed by the kernel again at every step (about a fifth of the step on configs/bench_cpu).
/// A 1 GiB threshold and trim threshold keep such blocks in the heap for reuse; the peak
/// resident set is unchanged, freed memory is just not handed back between steps.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn keep_large_blocks_in_the_heap() {
    const GIB: libc::c_int = 1 << 30;
    // SAFETY: mallopt only changes allocator parameters; it is called before any thread
    // exists. A refusal (return 0) leaves glibc's defaults, which are correct, only slower.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, GIB);
        libc::mallopt(libc::M_TRIM_THRESHOLD, GIB);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_large_blocks_in_the_heap() {}

fn main() -> ExitCode {
    keep_large_blocks_in_the_heap();
    let cli = sepdist_cli::Cli::parse();
    match sepdist_cli::run(cli, &HEAP) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprintln!("error: {}", sepdist_cli::error_message(&failure.error));
            ExitCode::from(failure.code)
        }
    }
}

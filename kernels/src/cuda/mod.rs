//! The CUDA backend's foundation: kernel sources (one `.cu` file per op family, a shared
//! header with the canonical arithmetic), run-time compilation through a dynamically
//! loaded NVRTC, and driver/device detection that never touches a missing library.
//!
//! [`backend::CudaBackend`] runs the forward pass on any [`device::Device`]: the GPU
//! ([`driver::CudarcDevice`]) or, in tests, the CPU emulator of the same kernels.

pub mod backend;
pub mod detect;
pub mod device;
pub mod driver;
#[cfg(feature = "cuda-emulator")]
pub mod emu;
pub mod nvrtc;

pub use backend::{CudaBackend, known_answer_test};
pub use device::{CudaError, Device, Kernel, QuantType};
pub use driver::{CudaOptions, CudarcDevice};

/// The shared header, included by every kernel file.
pub const COMMON_HEADER: (&str, &str) = ("common.cuh", include_str!("../../cuda/common.cuh"));

/// Every kernel file: (name, source).
pub const SOURCES: &[(&str, &str)] = &[
    ("quant.cu", include_str!("../../cuda/quant.cu")),
    ("norm.cu", include_str!("../../cuda/norm.cu")),
    ("attention.cu", include_str!("../../cuda/attention.cu")),
    ("ffn.cu", include_str!("../../cuda/ffn.cu")),
    ("sampling.cu", include_str!("../../cuda/sampling.cu")),
];

/// NVRTC options every kernel is compiled with: no FMA contraction, IEEE division and
/// square root, no fast-math — the determinism contract.
pub fn compile_options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--fmad=false".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "--ftz=false".into(),
        "--std=c++17".into(),
    ]
}

/// Cache key of compiled kernels: blake3 of every source, the options (which name the
/// architecture), the NVRTC version that compiles them and the driver version that
/// loads them — a newer NVRTC or driver must never be handed an image made for another.
/// Versions are as the CUDA APIs give them (`nvrtcVersion`'s pair, `cuDriverGetVersion`'s
/// `1000 * major + 10 * minor`).
pub fn kernel_cache_key(arch: &str, nvrtc: (i32, i32), driver: i32) -> String {
    let mut h = blake3::Hasher::new();
    h.update(COMMON_HEADER.1.as_bytes());
    for (name, src) in SOURCES {
        h.update(name.as_bytes());
        h.update(src.as_bytes());
    }
    for o in compile_options(arch) {
        h.update(o.as_bytes());
    }
    h.update(format!("nvrtc {}.{}; driver {driver}", nvrtc.0, nvrtc.1).as_bytes());
    h.finalize().to_hex()[..32].to_owned()
}

//! Choosing the compute backend at start-up. CUDA serves only where a driver and a
//! device exist, the kernels build, and the known-answer self-test passes for every
//! served model (its logits the CPU's bits): `auto` otherwise falls back to the CPU and
//! says why; `cuda` refuses to start.

use std::path::PathBuf;
use std::sync::Arc;

use sampo_kernels::cuda::backend::GpuBackend;
use sampo_kernels::cuda::{CudaError, CudaOptions, known_answer_test};
use sampo_kernels::{Backend, CpuBackend, Model};
use tracing::{info, warn};

use crate::config::BackendChoice;

pub struct Chosen {
    pub backend: Arc<dyn Backend>,
    /// "cpu" or "cuda".
    pub kind: &'static str,
    /// Why `auto` serves on the CPU.
    pub cpu_reason: Option<String>,
}

/// Open the GPU, upload every model and run the self-test on each.
pub fn open_cuda(opts: &CudaOptions, models: &[Arc<Model>]) -> Result<Arc<GpuBackend>, CudaError> {
    let gpu = GpuBackend::open(opts)?;
    let b = &gpu.device_handle().build;
    info!(arch = %b.arch, cached = b.cached, compiled = b.compiled, "CUDA kernels ready");
    for m in models {
        gpu.load(m)?;
        let ka = known_answer_test(&*gpu, m)?;
        info!(model = %m.hp.name, logits = ka.logits_compared, digest = %ka.digest, "CUDA known-answer self-test passed");
    }
    Ok(gpu)
}

pub fn choose(
    choice: BackendChoice,
    threads: usize,
    nvrtc: Option<PathBuf>,
    ptx_cache: Option<PathBuf>,
    models: &[Arc<Model>],
) -> Result<Chosen, String> {
    let cpu = |reason: Option<String>| -> Result<Chosen, String> {
        let b = CpuBackend::new(threads).map_err(|e| e.to_string())?;
        Ok(Chosen { backend: Arc::new(b), kind: "cpu", cpu_reason: reason })
    };
    if choice == BackendChoice::Cpu {
        return cpu(None);
    }
    let opts = CudaOptions { nvrtc, ptx_cache };
    match (choice, open_cuda(&opts, models)) {
        (_, Ok(gpu)) => {
            info!(device = %gpu.device(), "serving on CUDA");
            Ok(Chosen { backend: gpu, kind: "cuda", cpu_reason: None })
        }
        (BackendChoice::Cuda, Err(e)) => Err(format!("execution.backend = \"cuda\": {e}")),
        (_, Err(e)) => {
            match &e {
                CudaError::Unavailable(_) => info!(reason = %e, "backend auto: using the CPU"),
                // A device exists but cannot be trusted or used: louder.
                _ => warn!(reason = %e, "backend auto: the CUDA device is not used; using the CPU"),
            }
            cpu(Some(e.to_string()))
        }
    }
}

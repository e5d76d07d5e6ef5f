//! The host's floating-point environment. Bit-identical results assume IEEE subnormals
//! on every thread that computes (the CPU backend's workers, sampling, the self-test's
//! reference): with flush-to-zero (FTZ) or denormals-are-zero (DAZ) set, a tiny value
//! becomes 0 on one node and not on another. Nothing in sampo sets them, but a library
//! loaded into the process can (one built with `-ffast-math` sets both in a constructor
//! of the thread that loads it, and threads started afterwards inherit them), so they
//! are checked, not assumed.

/// MXCSR's flush-to-zero bit.
pub const MXCSR_FTZ: u32 = 1 << 15;
/// MXCSR's denormals-are-zero bit.
pub const MXCSR_DAZ: u32 = 1 << 6;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "thread {thread} flushes subnormals to zero (MXCSR {mxcsr:#06x}: FTZ {}, DAZ {}); sampo's \
     bit-identical arithmetic needs IEEE subnormals — a library built with -ffast-math, loaded \
     into this process, is the usual cause",
    mxcsr & MXCSR_FTZ != 0,
    mxcsr & MXCSR_DAZ != 0
)]
pub struct FlushToZero {
    pub thread: String,
    pub mxcsr: u32,
}

/// This thread's MXCSR (x86_64), or `None` where there is none to read.
pub fn mxcsr() -> Option<u32> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut v: u32 = 0;
        // SAFETY: `stmxcsr` stores the 4-byte register to the address given, which is
        // a live, aligned u32; it changes no flags and touches no stack.
        unsafe { std::arch::asm!("stmxcsr [{}]", in(reg) &raw mut v, options(nostack, preserves_flags)) };
        Some(v)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Whether this thread computes with IEEE subnormals (always true where there is no
/// MXCSR to read: other architectures are not checked yet).
pub fn check() -> Result<(), FlushToZero> {
    match mxcsr() {
        Some(m) if m & (MXCSR_FTZ | MXCSR_DAZ) != 0 => {
            let t = std::thread::current();
            let thread = t.name().map_or_else(|| format!("{:?}", t.id()), str::to_owned);
            Err(FlushToZero { thread, mxcsr: m })
        }
        _ => Ok(()),
    }
}

/// [`check`] on every worker of `pool` (each runs it; the first failure is returned).
/// A pool's start handler could check too, but could not return the error.
pub fn check_pool(pool: &rayon::ThreadPool) -> Result<(), FlushToZero> {
    pool.broadcast(|_| check()).into_iter().collect()
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Run `f` on a fresh thread whose MXCSR has `bits` set.
    fn with_mxcsr_bits<T: Send>(bits: u32, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                let v = mxcsr().expect("x86_64") | bits;
                // SAFETY: only the FTZ/DAZ control bits are added to a valid MXCSR value;
                // the thread is ours and ends with the closure.
                unsafe { std::arch::asm!("ldmxcsr [{}]", in(reg) &raw const v, options(nostack, readonly)) };
                f()
            })
            .join()
            .expect("thread")
        })
    }

    #[test]
    fn flush_to_zero_and_denormals_are_zero_are_each_reported() {
        assert_eq!(check(), Ok(()), "a test thread starts with IEEE subnormals");
        for (bit, name) in [(MXCSR_FTZ, "FTZ true, DAZ false"), (MXCSR_DAZ, "FTZ false, DAZ true")] {
            let (got, tiny) = with_mxcsr_bits(bit, || {
                // The bit really is on: a subnormal product is flushed (FTZ) or a
                // subnormal input is read as zero (DAZ).
                let x = std::hint::black_box(f32::from_bits(1)) * std::hint::black_box(1.5f32);
                (check(), x)
            });
            assert_eq!(tiny, 0.0, "{name}: the bit took effect");
            let err = got.expect_err("reported");
            assert!(err.mxcsr & bit != 0 && err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn a_pool_with_a_flushing_worker_is_refused_by_name() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .thread_name(|i| format!("fp-worker-{i}"))
            .start_handler(|i| {
                if i == 1 {
                    let v = mxcsr().unwrap_or(0x1f80) | MXCSR_FTZ;
                    // SAFETY: as above, on this worker only.
                    unsafe { std::arch::asm!("ldmxcsr [{}]", in(reg) &raw const v, options(nostack, readonly)) };
                }
            })
            .build()
            .expect("pool");
        let err = check_pool(&pool).expect_err("worker 1 flushes");
        assert_eq!(err.thread, "fp-worker-1");
        let clean = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("pool");
        assert_eq!(check_pool(&clean), Ok(()));
    }

    #[test]
    fn the_cpu_backend_and_the_self_test_refuse_a_flushing_thread() {
        let m = crate::Model::from_gguf(
            crate::gguf::GgufFile::from_bytes(crate::synth::synthesize(&crate::synth::SynthSpec::default()))
                .expect("gguf"),
        )
        .expect("model");
        // Any backend will do as the one under test: the host is checked first.
        let reference = crate::CpuBackend::new(1).expect("built on a clean thread");
        let (backend, selftest) = with_mxcsr_bits(MXCSR_FTZ, || {
            let cpu = crate::CpuBackend::new(2);
            (cpu.map(|_| ()), crate::cuda::known_answer_test(&reference, &m).map(|_| ()))
        });
        assert!(matches!(backend, Err(crate::KernelError::FloatEnv(_))), "{backend:?}");
        assert!(matches!(selftest, Err(crate::cuda::CudaError::FloatEnv(_))), "{selftest:?}");
        // On a clean thread both work.
        assert!(crate::CpuBackend::new(2).is_ok());
        // A one-thread backend runs each pass on the caller's thread: that thread is
        // checked, whichever made the backend.
        use crate::Backend;
        let pass =
            with_mxcsr_bits(MXCSR_FTZ, || reference.forward_all(&m, &mut crate::Sequence::new(&m), &[1]).map(|_| ()));
        let err = pass.expect_err("a pass on a flushing thread");
        assert!(err.to_string().contains("FTZ true"), "{err}");
        assert!(reference.forward_all(&m, &mut crate::Sequence::new(&m), &[1]).is_ok());
    }
}

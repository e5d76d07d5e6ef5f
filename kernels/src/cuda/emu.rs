//! The CUDA kernels on the CPU (`cuda-emulator` feature): the same `.cu` sources,
//! compiled by the host C++ compiler against `cuda/emu/emu.h`, which runs each CUDA
//! thread as a fiber. Device addresses are host addresses. Slow, and only for tests:
//! it checks the backend's host code and the kernels' logic without a GPU.
//!
//! It refuses what the hardware leaves undefined (a full-mask shuffle after a lane of
//! the warp exited, divergent shuffles, deadlocked barriers) with a launch error, and
//! runs the blocks of each launch in a different seeded order, so a kernel whose blocks
//! depend on each other's order gives wrong results here rather than only on a GPU.

use std::alloc::Layout;
use std::ffi::{CString, c_char, c_int, c_uint};
use std::sync::Mutex;

use super::device::{Arg, CudaError, Device, Kernel, Shape};

unsafe extern "C" {
    fn sampo_emu_launch(
        name: *const c_char,
        grid: *const c_uint,
        block: *const c_uint,
        args: *const u64,
        nargs: c_int,
        order_seed: u64,
    ) -> c_int;
    fn sampo_emu_last_error() -> *const c_char;
}

/// What a failed emulator launch's code means (emu.cpp `sampo_emu_launch`).
fn launch_failure(code: c_int) -> &'static str {
    match code {
        -1 => "no such kernel in the emulator",
        -2 => "wrong number of arguments",
        -3 => "bad launch shape",
        -4 => "full-mask warp shuffle or __syncwarp after a lane of the warp exited",
        -5 => "lanes of one warp met at different shuffle call sites (divergent shuffles)",
        -6 => "a warp mask other than 0xffffffff",
        -7 => "deadlock at a barrier",
        _ => "unknown emulator failure",
    }
}

/// Host memory standing in for device memory.
pub struct EmuBuffer {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the buffer is plain memory owned by this value; the emulator serializes use.
unsafe impl Send for EmuBuffer {}
unsafe impl Sync for EmuBuffer {}

impl Drop for EmuBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `alloc` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

type Launches = Vec<(Kernel, Shape, Vec<Arg>)>;

/// Launches recorded between `begin_capture` and `end_capture`.
pub struct EmuGraph(Launches);

/// A deliberate fault, to test that a failing device is refused: after each launch of
/// the kernel, flip the sign of the first float at its argument `arg`.
#[derive(Debug, Clone, Copy)]
pub struct Fault {
    pub kernel: Kernel,
    pub arg: usize,
}

/// When a [`Fault`] strikes: faults that only some serving paths reach show whether a
/// self-test covers those paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultWhen {
    /// After every launch of the kernel.
    Always,
    /// Only when a row of the launch is at a position above `pos`: the launch's
    /// argument `pos_arg` addresses one i32 position per row, `grid[1]` rows (the
    /// layout of `attention`).
    PositionAbove { pos_arg: usize, pos: i32 },
    /// Only while a captured graph is replayed, in launches of `rows` rows (`grid[1]`).
    Replay { rows: u32 },
}

pub struct EmuDevice {
    capture: Mutex<Option<Launches>>,
    fault: Option<(Fault, FaultWhen)>,
    launches: std::sync::atomic::AtomicU64,
    /// Seeds each launch's block order (with the launch's number); `None`: in order.
    block_order: Option<u64>,
}

impl Default for EmuDevice {
    fn default() -> Self {
        Self {
            capture: Mutex::new(None),
            fault: None,
            launches: std::sync::atomic::AtomicU64::new(0),
            block_order: Some(DEFAULT_ORDER_SEED),
        }
    }
}

/// The default block-order seed: fixed, so a failure reproduces run after run.
const DEFAULT_ORDER_SEED: u64 = 0x5a3b_0c0d_e0de_1234;

impl EmuDevice {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_fault(fault: Fault) -> Self {
        Self::with_fault_when(fault, FaultWhen::Always)
    }

    pub fn with_fault_when(fault: Fault, when: FaultWhen) -> Self {
        Self { fault: Some((fault, when)), ..Self::default() }
    }

    /// Whether the fault strikes this launch.
    fn strikes(when: FaultWhen, shape: Shape, args: &[Arg], replaying: bool) -> bool {
        match when {
            FaultWhen::Always => true,
            FaultWhen::Replay { rows } => replaying && shape.grid[1] == rows,
            FaultWhen::PositionAbove { pos_arg, pos } => match args.get(pos_arg) {
                Some(Arg::Ptr(p)) if *p != 0 => (0..shape.grid[1] as usize).any(|r| {
                    // SAFETY: the argument addresses one i32 per row of the launch.
                    unsafe { *(*p as *const i32).add(r) > pos }
                }),
                _ => false,
            },
        }
    }

    /// Blocks in the order of permutations seeded by `seed` (a different one for each
    /// launch), or one after another in index order with `None`.
    pub fn with_block_order(mut self, seed: Option<u64>) -> Self {
        self.block_order = seed;
        self
    }

    /// Kernels run so far (replays count each kernel).
    pub fn launches(&self) -> u64 {
        self.launches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Launch a kernel by its `extern "C"` name: the backend's kernels and the
    /// emulator's test-only ones (`kernels/cuda/emu/faults.cu`).
    pub fn launch_named(&self, name: &'static str, shape: Shape, args: &[Arg]) -> Result<(), CudaError> {
        self.run_named(name, shape, args)
    }

    fn run(&self, kernel: Kernel, shape: Shape, args: &[Arg], replaying: bool) -> Result<(), CudaError> {
        self.run_named(kernel.name(), shape, args)?;
        if let Some((f, when)) = self.fault
            && f.kernel == kernel
            && Self::strikes(when, shape, args, replaying)
            && let Some(Arg::Ptr(p)) = args.get(f.arg)
        {
            // SAFETY: the argument is an output buffer of at least one float.
            unsafe { *(*p as *mut u32) ^= 0x8000_0000 };
        }
        Ok(())
    }

    fn run_named(&self, kernel: &'static str, shape: Shape, args: &[Arg]) -> Result<(), CudaError> {
        let name = CString::new(kernel).map_err(|_| CudaError::Launch { kernel, reason: "name".into() })?;
        let slots: Vec<u64> = args.iter().map(|a| a.slot()).collect();
        let n = self.launches.load(std::sync::atomic::Ordering::Relaxed);
        // Never 0 (which means in order) for a shuffled launch.
        let seed = self.block_order.map_or(0, |s| (s ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)).max(1));
        // SAFETY: the kernel reads and writes the addresses it is given, which the
        // backend sized for this launch (the same contract as a GPU launch).
        let code = unsafe {
            sampo_emu_launch(
                name.as_ptr(),
                shape.grid.as_ptr(),
                shape.block.as_ptr(),
                slots.as_ptr(),
                slots.len() as c_int,
                seed,
            )
        };
        if code != 0 {
            // SAFETY: a NUL-terminated string owned by this thread's emulator state,
            // valid until its next launch; copied at once.
            let detail = unsafe { std::ffi::CStr::from_ptr(sampo_emu_last_error()) }.to_string_lossy().into_owned();
            let what = launch_failure(code);
            let reason = if detail.is_empty() { what.to_owned() } else { format!("{what}: {detail}") };
            return Err(CudaError::Launch { kernel, reason });
        }
        self.launches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

impl Device for EmuDevice {
    type Buffer = EmuBuffer;
    type Graph = EmuGraph;

    fn alloc(&self, bytes: usize) -> Result<EmuBuffer, CudaError> {
        let layout = Layout::from_size_align(bytes.max(1), 256)
            .map_err(|e| CudaError::OutOfMemory { bytes, reason: e.to_string() })?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(CudaError::OutOfMemory { bytes, reason: "host allocation failed".into() });
        }
        Ok(EmuBuffer { ptr, layout })
    }

    fn addr(&self, buf: &EmuBuffer) -> u64 {
        buf.ptr as u64
    }

    fn upload(&self, dst: u64, src: &[u8]) -> Result<(), CudaError> {
        // SAFETY: `dst` is an address inside a live buffer with room (backend contract).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    fn download(&self, src: u64, dst: &mut [u8]) -> Result<(), CudaError> {
        // SAFETY: as for `upload`.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<(), CudaError> {
        // SAFETY: as for `upload`; the backend never copies a buffer onto itself.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }

    fn synchronize(&self) -> Result<(), CudaError> {
        Ok(())
    }

    fn launch(&self, kernel: Kernel, shape: Shape, args: &[Arg]) -> Result<(), CudaError> {
        let mut cap =
            self.capture.lock().map_err(|_| CudaError::Launch { kernel: kernel.name(), reason: "poisoned".into() })?;
        if let Some(rec) = cap.as_mut() {
            rec.push((kernel, shape, args.to_vec()));
            return Ok(());
        }
        drop(cap);
        self.run(kernel, shape, args, false)
    }

    fn begin_capture(&self) -> Result<(), CudaError> {
        let mut cap =
            self.capture.lock().map_err(|_| CudaError::Driver { call: "begin_capture", reason: "poisoned".into() })?;
        *cap = Some(Vec::new());
        Ok(())
    }

    fn end_capture(&self) -> Result<EmuGraph, CudaError> {
        let mut cap =
            self.capture.lock().map_err(|_| CudaError::Driver { call: "end_capture", reason: "poisoned".into() })?;
        cap.take().map(EmuGraph).ok_or(CudaError::Driver { call: "end_capture", reason: "not capturing".into() })
    }

    fn replay(&self, graph: &EmuGraph) -> Result<(), CudaError> {
        for (k, s, a) in &graph.0 {
            self.run(*k, *s, a, true)?;
        }
        Ok(())
    }

    fn memory(&self) -> Result<(u64, u64), CudaError> {
        Ok((0, 0))
    }

    fn name(&self) -> String {
        "sampo CUDA emulator (CPU)".into()
    }

    fn compute_capability(&self) -> (i32, i32) {
        (0, 0)
    }
}

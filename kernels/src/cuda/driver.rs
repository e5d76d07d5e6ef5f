//! The GPU behind [`Device`]: a CUDA context and one stream through `cudarc` (loaded
//! at run time), kernels compiled by NVRTC for the device's compute capability and
//! cached on disk as PTX keyed by the sources, the options and the architecture.

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, result, sys};

use super::device::{Arg, CudaError, Device, Kernel, Shape};
use super::nvrtc::Nvrtc;
use super::{COMMON_HEADER, SOURCES, compile_options, detect, ptx_cache_key};

/// Where to find NVRTC and where to keep compiled PTX.
#[derive(Debug, Clone, Default)]
pub struct CudaOptions {
    /// NVRTC library file; otherwise `SAMPO_NVRTC`, the loader's search path, the CUDA
    /// toolkit's usual folders and the PyPI package `nvidia-cuda-nvrtc`.
    pub nvrtc: Option<PathBuf>,
    /// PTX cache folder; none means compile every start.
    pub ptx_cache: Option<PathBuf>,
}

/// How the kernels were obtained at start-up.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KernelBuild {
    pub arch: String,
    pub cache_key: String,
    /// Files loaded from the PTX cache / compiled by NVRTC now.
    pub cached: usize,
    pub compiled: usize,
}

pub struct GpuBuffer {
    _slice: CudaSlice<u8>,
    addr: u64,
}

/// A captured decode step.
pub struct GpuGraph(CudaGraph);
// SAFETY: a graph is only launched or dropped under the backend's lock, never from two
// threads at once (cudarc leaves it !Send because CUDA graphs are not thread-safe).
unsafe impl Send for GpuGraph {}

pub struct CudarcDevice {
    ctx: Arc<CudaContext>,
    /// Every copy and launch, in order; graphs are captured from it.
    stream: Arc<CudaStream>,
    /// Allocations and frees only. A buffer frees on the stream it was allocated on, and
    /// a sequence may be dropped by any thread at any time: its free must never land in
    /// a graph being captured on `stream`.
    mem: Arc<CudaStream>,
    funcs: HashMap<Kernel, CudaFunction>,
    name: String,
    cc: (i32, i32),
    pub build: KernelBuild,
}

fn drv(call: &'static str) -> impl Fn(result::DriverError) -> CudaError {
    move |e| CudaError::Driver { call, reason: e.to_string() }
}

/// Candidate NVRTC libraries, most specific first.
fn nvrtc_candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut c = Vec::new();
    if let Some(p) = explicit {
        return vec![p.to_path_buf()];
    }
    if let Some(p) = std::env::var_os("SAMPO_NVRTC") {
        return vec![PathBuf::from(p)];
    }
    for name in ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"] {
        c.push(PathBuf::from(name));
    }
    for dir in ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib", "/usr/lib/x86_64-linux-gnu"] {
        c.push(Path::new(dir).join("libnvrtc.so"));
    }
    // The PyPI wheel (scripts/setup.sh installs it) under the interpreter's site-packages.
    if let Ok(out) = std::process::Command::new("python3")
        .args(["-c", "import nvidia, os; print(list(nvidia.__path__)[0])"])
        .output()
    {
        let base = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        c.push(base.join("cu13/lib/libnvrtc.so.13"));
        c.push(base.join("cuda_nvrtc/lib/libnvrtc.so.12"));
    }
    c
}

fn load_nvrtc(explicit: Option<&Path>) -> Result<Nvrtc, CudaError> {
    let mut tried = Vec::new();
    for p in nvrtc_candidates(explicit) {
        match Nvrtc::load(&p) {
            Ok(n) => return Ok(n),
            Err(e) => tried.push(e.to_string()),
        }
    }
    Err(CudaError::Nvrtc(format!("no NVRTC library could be loaded ({})", tried.join("; "))))
}

/// Where the PTX for `arch` and the current sources is cached.
fn cache_dir(opts: &CudaOptions, arch: &str) -> Option<PathBuf> {
    opts.ptx_cache.as_ref().map(|d| d.join(format!("{arch}-{}", ptx_cache_key(arch))))
}

/// PTX text per source file name.
pub type PtxFiles = Vec<(&'static str, String)>;

/// PTX for every source file: from the cache where present, else compiled (and cached).
pub fn kernels_ptx(arch: &str, opts: &CudaOptions) -> Result<(PtxFiles, KernelBuild), CudaError> {
    let key = ptx_cache_key(arch);
    let dir = cache_dir(opts, arch);
    let mut build = KernelBuild { arch: arch.into(), cache_key: key, cached: 0, compiled: 0 };
    let mut nvrtc = None;
    let mut out = Vec::new();
    for (name, src) in SOURCES {
        let cached = dir.as_ref().and_then(|d| std::fs::read_to_string(d.join(format!("{name}.ptx"))).ok());
        if let Some(ptx) = cached.filter(|p| p.contains(".entry")) {
            build.cached += 1;
            out.push((*name, ptx));
            continue;
        }
        if nvrtc.is_none() {
            nvrtc = Some(load_nvrtc(opts.nvrtc.as_deref())?);
        }
        let n = nvrtc.as_ref().ok_or_else(|| CudaError::Nvrtc("not loaded".into()))?;
        let compiled = n
            .compile(name, src, &[COMMON_HEADER], &compile_options(arch))
            .map_err(|e| CudaError::Nvrtc(e.to_string()))?;
        if let Some(d) = &dir {
            // Best effort: a read-only cache costs a compile per start, nothing more.
            let tmp = d.join(format!("{name}.ptx.tmp"));
            let _ = std::fs::create_dir_all(d)
                .and_then(|()| std::fs::write(&tmp, &compiled.ptx))
                .and_then(|()| std::fs::rename(&tmp, d.join(format!("{name}.ptx"))));
        }
        build.compiled += 1;
        out.push((*name, compiled.ptx));
    }
    Ok((out, build))
}

impl CudarcDevice {
    /// Check for a driver and a device first (no library is touched blindly), then
    /// create the context, compile or load the kernels and resolve every function.
    pub fn open(opts: &CudaOptions) -> Result<Self, CudaError> {
        detect::probe()?;
        let ctx = CudaContext::new(0).map_err(drv("cuCtxCreate"))?;
        // One stream, ordered: no per-buffer events needed (they would also be
        // recorded into captured graphs).
        // SAFETY: called before any buffer exists; all work goes to one stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(drv("cuStreamCreate"))?;
        let mem = ctx.new_stream().map_err(drv("cuStreamCreate"))?;
        let cc = ctx.compute_capability().map_err(drv("cuDeviceGetAttribute"))?;
        let name = ctx.name().map_err(drv("cuDeviceGetName"))?;
        let arch = format!("compute_{}{}", cc.0, cc.1);
        let (ptx, mut build) = kernels_ptx(&arch, opts)?;
        let mut modules = HashMap::new();
        for (file, src) in ptx {
            let module = match ctx.load_module(cudarc::nvrtc::Ptx::from_src(src)) {
                Ok(m) => m,
                Err(e) if build.cached > 0 => {
                    // A stale or foreign cache entry: drop it and compile it afresh (which
                    // writes the cache again).
                    tracing::warn!(file, error = %e, "cached PTX did not load; recompiling");
                    if let Some(d) = cache_dir(opts, &arch) {
                        let _ = std::fs::remove_file(d.join(format!("{file}.ptx")));
                    }
                    let (again, b) = kernels_ptx(&arch, opts)?;
                    build.compiled += b.compiled;
                    let src = again.into_iter().find(|(f, _)| *f == file).map(|(_, s)| s).unwrap_or_default();
                    ctx.load_module(cudarc::nvrtc::Ptx::from_src(src)).map_err(drv("cuModuleLoadData"))?
                }
                Err(e) => return Err(drv("cuModuleLoadData")(e)),
            };
            modules.insert(file, module);
        }
        let mut funcs = HashMap::new();
        for k in Kernel::ALL {
            let m = modules
                .get(k.file())
                .ok_or_else(|| CudaError::Launch { kernel: k.name(), reason: format!("{} not loaded", k.file()) })?;
            funcs.insert(k, m.load_function(k.name()).map_err(drv("cuModuleGetFunction"))?);
        }
        Ok(Self { ctx, stream, mem, funcs, name, cc, build })
    }

    fn bind(&self) -> Result<(), CudaError> {
        self.ctx.bind_to_thread().map_err(drv("cuCtxSetCurrent"))
    }
}

impl Device for CudarcDevice {
    type Buffer = GpuBuffer;
    type Graph = GpuGraph;

    fn alloc(&self, bytes: usize) -> Result<GpuBuffer, CudaError> {
        self.bind()?;
        let slice = self
            .mem
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(|e| CudaError::OutOfMemory { bytes, reason: e.to_string() })?;
        // Zeroed before `stream` uses it.
        self.mem.synchronize().map_err(drv("cuStreamSynchronize"))?;
        let addr = slice.device_ptr(&self.mem).0;
        Ok(GpuBuffer { _slice: slice, addr })
    }

    fn addr(&self, buf: &GpuBuffer) -> u64 {
        buf.addr
    }

    fn upload(&self, dst: u64, src: &[u8]) -> Result<(), CudaError> {
        self.bind()?;
        // SAFETY: `dst` lies in a live allocation with room for `src` (backend contract);
        // a pageable source is staged before the call returns.
        unsafe { result::memcpy_htod_async(dst, src, self.stream.cu_stream()) }.map_err(drv("cuMemcpyHtoDAsync"))
    }

    fn download(&self, src: u64, dst: &mut [u8]) -> Result<(), CudaError> {
        self.bind()?;
        // SAFETY: as for `upload`; the stream is synchronized before `dst` is read.
        unsafe { result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }.map_err(drv("cuMemcpyDtoHAsync"))?;
        self.stream.synchronize().map_err(drv("cuStreamSynchronize"))
    }

    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<(), CudaError> {
        self.bind()?;
        // SAFETY: both ranges lie in live allocations (backend contract).
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }.map_err(drv("cuMemcpyDtoDAsync"))
    }

    fn synchronize(&self) -> Result<(), CudaError> {
        self.bind()?;
        self.stream.synchronize().map_err(drv("cuStreamSynchronize"))
    }

    fn launch(&self, kernel: Kernel, shape: Shape, args: &[Arg]) -> Result<(), CudaError> {
        self.bind()?;
        let f =
            self.funcs.get(&kernel).ok_or(CudaError::Launch { kernel: kernel.name(), reason: "not loaded".into() })?;
        let mut slots: Vec<u64> = args.iter().map(|a| a.slot()).collect();
        let mut params: Vec<*mut c_void> = slots.iter_mut().map(|s| (s as *mut u64).cast()).collect();
        let [gx, gy, gz] = shape.grid;
        let [bx, by, bz] = shape.block;
        // SAFETY: the arguments match the kernel's parameters in order and width (each
        // slot holds its value little-endian), and address buffers sized for this launch.
        unsafe {
            result::launch_kernel(f.cu_function(), (gx, gy, gz), (bx, by, bz), 0, self.stream.cu_stream(), &mut params)
        }
        .map_err(|e| CudaError::Launch { kernel: kernel.name(), reason: e.to_string() })
    }

    fn begin_capture(&self) -> Result<(), CudaError> {
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(drv("cuStreamBeginCapture"))
    }

    fn end_capture(&self) -> Result<GpuGraph, CudaError> {
        self.stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(drv("cuStreamEndCapture"))?
            .map(GpuGraph)
            .ok_or(CudaError::Driver { call: "cuStreamEndCapture", reason: "empty graph".into() })
    }

    fn replay(&self, graph: &GpuGraph) -> Result<(), CudaError> {
        graph.0.launch().map_err(drv("cuGraphLaunch"))
    }

    fn memory(&self) -> Result<(u64, u64), CudaError> {
        self.bind()?;
        let (free, total) = self.ctx.mem_get_info().map_err(drv("cuMemGetInfo"))?;
        Ok((free as u64, total as u64))
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }
}

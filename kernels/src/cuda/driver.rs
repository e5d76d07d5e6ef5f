//! The GPU behind [`Device`]: a CUDA context and one stream through `cudarc` (loaded
//! at run time), kernels compiled by NVRTC to a cubin for the device's exact
//! architecture (PTX only where the driver can JIT it) and cached on disk, keyed by the
//! sources, the options, the architecture and the NVRTC and driver versions.

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice, result, sys,
};

use super::device::{Arg, CudaError, Device, Kernel, Shape};
use super::nvrtc::Nvrtc;
use super::{COMMON_HEADER, SOURCES, compile_options, detect, kernel_cache_key};

/// Where to find NVRTC and where to keep compiled kernels.
#[derive(Debug, Clone, Default)]
pub struct CudaOptions {
    /// NVRTC library file; otherwise `SAMPO_NVRTC`, the loader's search path, the CUDA
    /// toolkit's usual folders and the PyPI package `nvidia-cuda-nvrtc`.
    pub nvrtc: Option<PathBuf>,
    /// Compiled-kernel cache folder (cubins, or PTX); none means compile every start.
    pub ptx_cache: Option<PathBuf>,
}

/// What the kernels are built as for one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelFormat {
    /// Machine code for exactly the device's architecture (`sm_XY`): nothing is left for
    /// the driver to compile, so a driver older than NVRTC loads it too.
    Cubin,
    /// PTX for a virtual architecture (`compute_XY`), compiled by the driver at load. A
    /// driver rejects PTX from an NVRTC newer than itself, so this is only chosen when
    /// NVRTC cannot build a cubin for the device and the driver is at least as new.
    Ptx,
}

/// The `--gpu-architecture` the kernels are compiled for, and what that yields.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KernelTarget {
    /// `sm_90` for a cubin, `compute_90` for PTX.
    pub arch: String,
    pub format: KernelFormat,
}

impl KernelTarget {
    /// A cubin for compute capability `cc`.
    pub fn cubin(cc: (i32, i32)) -> Self {
        Self { arch: format!("sm_{}{}", cc.0, cc.1), format: KernelFormat::Cubin }
    }
}

/// A version pair as the driver API encodes versions (13.0 is 13000).
fn encoded((major, minor): (i32, i32)) -> i32 {
    1000 * major + 10 * minor
}

/// What to compile for a device of compute capability `cc`, given the NVRTC version,
/// the real architectures it supports (`10 * major + minor`) and the driver version.
pub fn choose_target(
    cc: (i32, i32),
    nvrtc: (i32, i32),
    supported: &[i32],
    driver: i32,
) -> Result<KernelTarget, CudaError> {
    let sm = 10 * cc.0 + cc.1;
    if supported.contains(&sm) {
        return Ok(KernelTarget::cubin(cc));
    }
    // A device newer than this NVRTC: PTX for the newest architecture it knows that the
    // device runs, compiled by the driver — which must then understand this PTX.
    match supported.iter().copied().filter(|&a| a <= sm).max() {
        Some(a) if driver >= encoded(nvrtc) => {
            Ok(KernelTarget { arch: format!("compute_{a}"), format: KernelFormat::Ptx })
        }
        best => Err(CudaError::Nvrtc(format!(
            "NVRTC {}.{} cannot build a cubin for sm_{sm}{}, and the driver (CUDA {}.{}) is older than \
             NVRTC, so it cannot compile NVRTC's PTX either: point execution.nvrtc (or SAMPO_NVRTC) at \
             an NVRTC no newer than the driver that knows sm_{sm}",
            nvrtc.0,
            nvrtc.1,
            if best.is_none() { " or any older architecture" } else { "" },
            driver / 1000,
            driver % 1000 / 10,
        ))),
    }
}

/// How the kernels were obtained at start-up.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KernelBuild {
    pub arch: String,
    pub format: KernelFormat,
    /// NVRTC's version, "13.0".
    pub nvrtc: String,
    /// The driver's version as `cuDriverGetVersion` gives it (12040 is 12.4).
    pub driver: i32,
    pub cache_key: String,
    /// Files loaded from the cache / compiled by NVRTC now.
    pub cached: usize,
    pub compiled: usize,
}

/// One kernel file, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelImage {
    Cubin(Vec<u8>),
    Ptx(String),
}

impl KernelImage {
    fn extension(format: KernelFormat) -> &'static str {
        match format {
            KernelFormat::Cubin => "cubin",
            KernelFormat::Ptx => "ptx",
        }
    }

    /// Bytes read back from the cache, if they look like an image of `format` (a torn
    /// or foreign file is compiled again, not handed to the driver).
    fn from_cached(format: KernelFormat, bytes: Vec<u8>) -> Option<Self> {
        match format {
            KernelFormat::Cubin => bytes.starts_with(b"\x7fELF").then_some(Self::Cubin(bytes)),
            KernelFormat::Ptx => String::from_utf8(bytes).ok().filter(|p| p.contains(".entry")).map(Self::Ptx),
        }
    }

    pub fn bytes(&self) -> &[u8] {
        match self {
            Self::Cubin(b) => b,
            Self::Ptx(p) => p.as_bytes(),
        }
    }

    /// What `cuModuleLoadData` is given (cudarc names every module image "Ptx").
    fn into_module(self) -> cudarc::nvrtc::Ptx {
        match self {
            Self::Cubin(b) => cudarc::nvrtc::Ptx::from_binary(b),
            Self::Ptx(p) => cudarc::nvrtc::Ptx::from_src(p),
        }
    }
}

/// A kernel file's image and whether it came from the cache.
#[derive(Debug, Clone)]
pub struct KernelFile {
    pub name: &'static str,
    pub image: KernelImage,
    pub cached: bool,
}

/// Things whose release must wait: dropped buffers are buried here and released by
/// [`Graveyard::drain`] once it is safe. If the graveyard itself goes (its device gone,
/// a buffer outliving it), `on_drop` runs before what it still holds is released.
pub struct Graveyard<T> {
    dead: Mutex<Vec<T>>,
    on_drop: Box<dyn Fn() + Send + Sync>,
}

impl<T> Graveyard<T> {
    pub fn new(on_drop: impl Fn() + Send + Sync + 'static) -> Self {
        Self { dead: Mutex::new(Vec::new()), on_drop: Box::new(on_drop) }
    }

    pub fn bury(&self, item: T) {
        // A poisoned lock still holds a valid list: keep burying.
        self.dead.lock().unwrap_or_else(|e| e.into_inner()).push(item);
    }

    /// Everything buried so far, for the caller to drop.
    pub fn drain(&self) -> Vec<T> {
        std::mem::take(&mut *self.dead.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl<T> Drop for Graveyard<T> {
    fn drop(&mut self) {
        (self.on_drop)();
        drop(self.drain());
    }
}

/// Make `ctx` current on this thread without `bind_to_thread`'s check of earlier errors
/// (which would clear them where nobody reads them); a failure is recorded in `ctx`, to
/// surface at its next checked call.
fn bind_quietly(ctx: &CudaContext) {
    // SAFETY: `ctx` is alive (borrowed), so its handle is a valid, undestroyed context.
    ctx.record_err(unsafe { result::ctx::set_current(ctx.cu_ctx()) });
}

/// Device memory. Dropping it (any thread, any time: a sequence's cache goes with its
/// sequence) calls no CUDA function: the memory is buried, and the device frees it the
/// next time the host has waited for every queued kernel (see [`CudarcDevice::reap`]).
/// Frees go to the allocation stream, which does not wait for the compute stream, so a
/// free issued at once could hand memory out again while kernels still read it; and
/// cudarc's drop binds no context, so on a thread without one it would fail, and the
/// failure surface in some unrelated later call.
pub struct GpuBuffer {
    slice: Option<CudaSlice<u8>>,
    addr: u64,
    graveyard: Arc<Graveyard<CudaSlice<u8>>>,
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        if let Some(s) = self.slice.take() {
            self.graveyard.bury(s);
        }
    }
}

/// A captured decode step; dropping it binds its context first (cudarc's drop does not).
pub struct GpuGraph {
    graph: Option<CudaGraph>,
    ctx: Arc<CudaContext>,
}
// SAFETY: a graph is only launched or dropped under the backend's lock, never from two
// threads at once (cudarc leaves it !Send because CUDA graphs are not thread-safe).
unsafe impl Send for GpuGraph {}

impl Drop for GpuGraph {
    fn drop(&mut self) {
        bind_quietly(&self.ctx);
        // An executable graph still running is freed when it completes (cuGraphExecDestroy).
        drop(self.graph.take());
    }
}

/// Bytes of the pinned staging buffer: room for the per-pass staging arrays, the
/// sampler's parameter words and the sampled ids (each a few KiB); larger copies (weights,
/// logits) take the pageable path.
const PINNED_BYTES: usize = 64 * 1024;

/// The pinned staging buffer and the event recorded on `stream` after each copy into or
/// out of it. The event is ours, not cudarc's: with event tracking disabled (one
/// stream), cudarc records none, and its `as_mut_slice` waits for nothing — so a pass's
/// staging written while the previous pass's copy still sat in the queue behind its
/// kernels became that pass's staging too (on an H200: a third pass of a long prompt
/// read the zeroed rows of the next one and wrote through a null cache pointer).
struct Staging {
    host: PinnedHostSlice<u8>,
    done: CudaEvent,
}

impl Staging {
    /// The buffer, once the last copy through it has run.
    fn ready(&mut self) -> Result<&mut [u8], CudaError> {
        self.done.synchronize().map_err(drv("cuEventSynchronize"))?;
        self.host.as_mut_slice().map_err(drv("cuEventSynchronize"))
    }

    fn copied(&self, stream: &CudaStream) -> Result<(), CudaError> {
        self.done.record(stream).map_err(drv("cuEventRecord"))
    }
}

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
    /// Dropped buffers, freed by [`Self::reap`].
    graveyard: Arc<Graveyard<CudaSlice<u8>>>,
    /// Page-locked host memory that every small copy goes through: from pageable memory
    /// the driver first copies into a pinned buffer of its own, synchronously, on every
    /// call; from here the copy is one DMA. `None` where it could not be allocated: then
    /// every copy takes the pageable path, as before.
    pinned: Mutex<Option<Staging>>,
    /// A graph is being captured on `stream`: copies stay on the pageable path, so no
    /// graph ever holds a copy out of the reused buffer (none is made during capture).
    capturing: AtomicBool,
}

fn drv(call: &'static str) -> impl Fn(result::DriverError) -> CudaError {
    move |e| CudaError::Driver { call, reason: e.to_string() }
}

/// Candidate NVRTC libraries, most specific first; among the usual places, those of the
/// driver's major CUDA version before the others.
fn nvrtc_candidates(explicit: Option<&Path>, driver_major: i32) -> Vec<PathBuf> {
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
    let suffix = format!(".so.{driver_major}");
    c.sort_by_key(|p| !p.to_string_lossy().ends_with(&suffix));
    c
}

fn load_nvrtc(explicit: Option<&Path>, driver_major: i32) -> Result<Nvrtc, CudaError> {
    let mut tried = Vec::new();
    for p in nvrtc_candidates(explicit, driver_major) {
        match Nvrtc::load(&p) {
            Ok(n) => return Ok(n),
            Err(e) => tried.push(e.to_string()),
        }
    }
    Err(CudaError::Nvrtc(format!("no NVRTC library could be loaded ({})", tried.join("; "))))
}

/// Compile one kernel file for `target`.
pub fn compile_kernel(nvrtc: &Nvrtc, target: &KernelTarget, name: &str, src: &str) -> Result<KernelImage, CudaError> {
    let out = nvrtc
        .compile(name, src, &[COMMON_HEADER], &compile_options(&target.arch))
        .map_err(|e| CudaError::Nvrtc(e.to_string()))?;
    match target.format {
        KernelFormat::Ptx => Ok(KernelImage::Ptx(out.ptx)),
        KernelFormat::Cubin => out
            .cubin
            .map(KernelImage::Cubin)
            .ok_or_else(|| CudaError::Nvrtc(format!("{name}: NVRTC made no cubin for {}", target.arch))),
    }
}

/// The cache folder of one build: the architecture and the key.
fn cache_folder(cache: &Path, target: &KernelTarget, key: &str) -> PathBuf {
    cache.join(format!("{}-{key}", target.arch))
}

fn cache_file(dir: &Path, name: &str, format: KernelFormat) -> PathBuf {
    dir.join(format!("{name}.{}", KernelImage::extension(format)))
}

/// Write `bytes` to `path` so that a reader sees the old file, the whole new one, or
/// none: a temporary name of this process (and call) first, then a rename. Two
/// processes starting together each write their own temporary file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().ok_or_else(|| std::io::Error::other("no parent folder"))?;
    std::fs::create_dir_all(dir)?;
    let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file}.{}.{}.tmp", std::process::id(), SERIAL.fetch_add(1, Ordering::Relaxed)));
    let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Every kernel file for `target`: from the cache folder `cache` where it holds a valid
/// image for these sources, options and versions, else compiled (and cached).
pub fn kernel_images(
    nvrtc: &Nvrtc,
    target: &KernelTarget,
    driver: i32,
    cache: Option<&Path>,
) -> Result<(Vec<KernelFile>, KernelBuild), CudaError> {
    let version = nvrtc.version().map_err(|e| CudaError::Nvrtc(e.to_string()))?;
    let key = kernel_cache_key(&target.arch, version, driver);
    let dir = cache.map(|c| cache_folder(c, target, &key));
    let mut build = KernelBuild {
        arch: target.arch.clone(),
        format: target.format,
        nvrtc: format!("{}.{}", version.0, version.1),
        driver,
        cache_key: key,
        cached: 0,
        compiled: 0,
    };
    let mut out = Vec::new();
    for (name, src) in SOURCES {
        let path = dir.as_ref().map(|d| cache_file(d, name, target.format));
        let cached =
            path.as_ref().and_then(|p| std::fs::read(p).ok()).and_then(|b| KernelImage::from_cached(target.format, b));
        if let Some(image) = cached {
            build.cached += 1;
            out.push(KernelFile { name, image, cached: true });
            continue;
        }
        let image = compile_kernel(nvrtc, target, name, src)?;
        if let Some(p) = &path {
            // Best effort: a read-only cache costs a compile per start, nothing more.
            if let Err(e) = write_atomically(p, image.bytes()) {
                tracing::debug!(file = %p.display(), error = %e, "kernel cache not written");
            }
        }
        build.compiled += 1;
        out.push(KernelFile { name, image, cached: false });
    }
    Ok((out, build))
}

impl CudarcDevice {
    /// Check for a driver and a device first (no library is touched blindly), then
    /// create the context, compile or load the kernels and resolve every function.
    pub fn open(opts: &CudaOptions) -> Result<Self, CudaError> {
        let info = detect::probe()?;
        let ctx = CudaContext::new(0).map_err(drv("cuCtxCreate"))?;
        // One stream, ordered: no per-buffer events needed (they would also be
        // recorded into captured graphs).
        // SAFETY: called before any buffer exists; all work goes to one stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(drv("cuStreamCreate"))?;
        let mem = ctx.new_stream().map_err(drv("cuStreamCreate"))?;
        let cc = ctx.compute_capability().map_err(drv("cuDeviceGetAttribute"))?;
        let name = ctx.name().map_err(drv("cuDeviceGetName"))?;
        let driver = info.driver_version;
        let nvrtc = load_nvrtc(opts.nvrtc.as_deref(), driver / 1000)?;
        let version = nvrtc.version().map_err(|e| CudaError::Nvrtc(e.to_string()))?;
        let archs = nvrtc.supported_archs().map_err(|e| CudaError::Nvrtc(e.to_string()))?;
        let target = choose_target(cc, version, &archs, driver)?;
        let (files, mut build) = kernel_images(&nvrtc, &target, driver, opts.ptx_cache.as_deref())?;
        let refused = |e: result::DriverError| CudaError::Driver {
            call: "cuModuleLoadData",
            reason: format!(
                "{e} (a {:?} for {} from NVRTC {}, driver CUDA {}.{}: use an NVRTC no newer than the driver)",
                target.format,
                target.arch,
                format_args!("{}.{}", version.0, version.1),
                driver / 1000,
                driver % 1000 / 10
            ),
        };
        let mut modules = HashMap::new();
        for f in files {
            let module = match ctx.load_module(f.image.into_module()) {
                Ok(m) => m,
                Err(e) if f.cached => {
                    // A damaged or foreign cache entry that looked valid: compile it
                    // afresh and overwrite it.
                    tracing::warn!(file = f.name, error = %e, "cached kernel image did not load; recompiling");
                    let src = SOURCES.iter().find(|(n, _)| *n == f.name).map(|(_, s)| *s).unwrap_or_default();
                    let image = compile_kernel(&nvrtc, &target, f.name, src)?;
                    if let Some(c) = &opts.ptx_cache {
                        let path = cache_file(&cache_folder(c, &target, &build.cache_key), f.name, target.format);
                        let _ = write_atomically(&path, image.bytes());
                    }
                    build.cached -= 1;
                    build.compiled += 1;
                    ctx.load_module(image.into_module()).map_err(refused)?
                }
                Err(e) => return Err(refused(e)),
            };
            modules.insert(f.name, module);
        }
        let mut funcs = HashMap::new();
        for k in Kernel::ALL {
            let m = modules
                .get(k.file())
                .ok_or_else(|| CudaError::Launch { kernel: k.name(), reason: format!("{} not loaded", k.file()) })?;
            funcs.insert(k, m.load_function(k.name()).map_err(drv("cuModuleGetFunction"))?);
        }
        let bound = ctx.clone();
        let graveyard = Arc::new(Graveyard::new(move || bind_quietly(&bound)));
        let pinned = Mutex::new(Self::alloc_staging(&ctx));
        Ok(Self { ctx, stream, mem, funcs, name, cc, build, graveyard, pinned, capturing: AtomicBool::new(false) })
    }

    /// The pinned staging buffer, zeroed; `None` (with a warning) if the driver refuses it.
    /// Flags 0, not cudarc's `alloc_pinned` (WRITECOMBINED): the host reads the sampled
    /// ids back from it, and reads of write-combined memory are uncached.
    fn alloc_staging(ctx: &Arc<CudaContext>) -> Option<Staging> {
        // SAFETY: the memory is uninitialized until zeroed below, before any read.
        let mut p = match unsafe { ctx.alloc_pinned_with_flags::<u8>(PINNED_BYTES, 0) } {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "no pinned staging buffer; small copies stay pageable");
                return None;
            }
        };
        match p.as_mut_ptr() {
            // SAFETY: `ptr` addresses PINNED_BYTES bytes of host memory owned by `p`.
            Ok(ptr) => unsafe { std::ptr::write_bytes(ptr, 0, PINNED_BYTES) },
            Err(e) => {
                tracing::warn!(error = %e, "no pinned staging buffer; small copies stay pageable");
                return None;
            }
        }
        match ctx.new_event(None) {
            Ok(done) => Some(Staging { host: p, done }),
            Err(e) => {
                tracing::warn!(error = %e, "no event for the pinned staging buffer; small copies stay pageable");
                None
            }
        }
    }

    /// Run `f` on the pinned staging buffer when a copy of `bytes` can use it: it exists,
    /// is large enough, and no graph is being captured. `None`: take the pageable path.
    fn with_staging<T>(
        &self,
        bytes: usize,
        f: impl FnOnce(&mut Staging) -> Result<T, CudaError>,
    ) -> Option<Result<T, CudaError>> {
        if bytes > PINNED_BYTES || self.capturing.load(Ordering::Acquire) {
            return None;
        }
        // A poisoned lock means a panic mid-copy: the buffer's contents are unknown, but
        // every use writes before it reads, so it stays usable.
        let mut guard = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_mut().map(f)
    }

    /// Free the buried buffers. Call only once every kernel queued before they were
    /// dropped has finished (after a synchronize), on a thread with the context bound.
    fn reap(&self) -> Result<(), CudaError> {
        drop(self.graveyard.drain());
        // A free (or a graph's destroy) that failed recorded its error in the context.
        self.ctx.check_err().map_err(drv("a deferred free or destroy"))
    }

    fn bind(&self) -> Result<(), CudaError> {
        self.ctx.bind_to_thread().map_err(drv("cuCtxSetCurrent"))
    }
}

impl Drop for CudarcDevice {
    fn drop(&mut self) {
        // What is buried now may still be read by queued work: wait, then free.
        bind_quietly(&self.ctx);
        self.ctx.record_err(self.stream.synchronize());
        drop(self.graveyard.drain());
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
        Ok(GpuBuffer { slice: Some(slice), addr, graveyard: self.graveyard.clone() })
    }

    fn addr(&self, buf: &GpuBuffer) -> u64 {
        buf.addr
    }

    fn upload(&self, dst: u64, src: &[u8]) -> Result<(), CudaError> {
        self.bind()?;
        let n = src.len();
        let pinned = self.with_staging(n, |p| {
            let host = p.ready()?;
            host[..n].copy_from_slice(src);
            // SAFETY: `dst` lies in a live allocation with room for `n` bytes (backend
            // contract); the host bytes are not written again before `done` (recorded
            // right after) has passed this copy.
            unsafe { result::memcpy_htod_async(dst, &host[..n], self.stream.cu_stream()) }
                .map_err(drv("cuMemcpyHtoDAsync"))?;
            p.copied(&self.stream)
        });
        if let Some(done) = pinned {
            return done;
        }
        // SAFETY: `dst` lies in a live allocation with room for `src` (backend contract);
        // a pageable source is staged before the call returns.
        unsafe { result::memcpy_htod_async(dst, src, self.stream.cu_stream()) }.map_err(drv("cuMemcpyHtoDAsync"))
    }

    fn download(&self, src: u64, dst: &mut [u8]) -> Result<(), CudaError> {
        self.bind()?;
        let n = dst.len();
        let pinned = self.with_staging(n, |p| {
            let host = p.ready()?;
            // SAFETY: `src` lies in a live allocation of `n` bytes (backend contract); the
            // stream is synchronized before the bytes are read.
            unsafe { result::memcpy_dtoh_async(&mut host[..n], src, self.stream.cu_stream()) }
                .map_err(drv("cuMemcpyDtoHAsync"))?;
            self.stream.synchronize().map_err(drv("cuStreamSynchronize"))?;
            dst.copy_from_slice(&host[..n]);
            p.copied(&self.stream)
        });
        match pinned {
            Some(done) => done?,
            None => {
                // SAFETY: as for `upload`; the stream is synchronized before `dst` is read.
                unsafe { result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
                    .map_err(drv("cuMemcpyDtoHAsync"))?;
                self.stream.synchronize().map_err(drv("cuStreamSynchronize"))?;
            }
        }
        self.reap()
    }

    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<(), CudaError> {
        self.bind()?;
        // SAFETY: both ranges lie in live allocations (backend contract).
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }.map_err(drv("cuMemcpyDtoDAsync"))
    }

    fn synchronize(&self) -> Result<(), CudaError> {
        self.bind()?;
        self.stream.synchronize().map_err(drv("cuStreamSynchronize"))?;
        self.reap()
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
        self.capturing.store(true, Ordering::Release);
        let begun = self
            .stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(drv("cuStreamBeginCapture"));
        if begun.is_err() {
            self.capturing.store(false, Ordering::Release);
        }
        begun
    }

    fn end_capture(&self) -> Result<GpuGraph, CudaError> {
        // Whatever the outcome, the stream is no longer capturing.
        self.capturing.store(false, Ordering::Release);
        self.stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(drv("cuStreamEndCapture"))?
            .map(|g| GpuGraph { graph: Some(g), ctx: self.ctx.clone() })
            .ok_or(CudaError::Driver { call: "cuStreamEndCapture", reason: "empty graph".into() })
    }

    fn replay(&self, graph: &GpuGraph) -> Result<(), CudaError> {
        self.bind()?;
        let g = graph.graph.as_ref().ok_or(CudaError::Driver { call: "cuGraphLaunch", reason: "dropped".into() })?;
        g.launch().map_err(drv("cuGraphLaunch"))
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

#[cfg(test)]
mod tests {
    use super::Graveyard;
    use std::sync::{Arc, Mutex};

    /// Logs its own drop.
    struct Noted(u32, Arc<Mutex<Vec<String>>>);
    impl Drop for Noted {
        fn drop(&mut self) {
            self.1.lock().expect("log").push(format!("free {}", self.0));
        }
    }

    #[test]
    fn buried_items_are_released_only_when_drained_and_the_context_is_bound_first() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let bind_log = log.clone();
        let g = Graveyard::new(move || bind_log.lock().expect("log").push("bind".to_owned()));
        g.bury(Noted(1, log.clone()));
        g.bury(Noted(2, log.clone()));
        assert!(log.lock().expect("log").is_empty(), "nothing is freed when buried");
        drop(g.drain());
        assert_eq!(*log.lock().expect("log"), ["free 1", "free 2"]);
        // What is still buried when the graveyard goes is freed after the bind.
        g.bury(Noted(3, log.clone()));
        drop(g);
        assert_eq!(*log.lock().expect("log"), ["free 1", "free 2", "bind", "free 3"]);
    }
}

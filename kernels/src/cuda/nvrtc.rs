//! NVRTC, loaded at run time from a given library file: no CUDA toolkit is needed to
//! build sampo, and a machine without NVRTC gets a typed error, not a crash.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum NvrtcError {
    #[error("cannot load NVRTC from {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("NVRTC lacks symbol {0}")]
    Symbol(&'static str),
    #[error("a kernel source or option contains a NUL byte")]
    Nul,
    #[error("{name}: NVRTC {call} failed with code {code}")]
    Call { name: String, call: &'static str, code: c_int },
    #[error("{name} did not compile:\n{log}")]
    Compile { name: String, log: String },
}

type Program = *mut c_void;
type CreateFn = unsafe extern "C" fn(
    *mut Program,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> c_int;
type CompileFn = unsafe extern "C" fn(Program, c_int, *const *const c_char) -> c_int;
type SizeFn = unsafe extern "C" fn(Program, *mut usize) -> c_int;
type GetFn = unsafe extern "C" fn(Program, *mut c_char) -> c_int;
type DestroyFn = unsafe extern "C" fn(*mut Program) -> c_int;
type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;
type NumArchsFn = unsafe extern "C" fn(*mut c_int) -> c_int;
type ArchsFn = unsafe extern "C" fn(*mut c_int) -> c_int;

/// A loaded NVRTC library.
pub struct Nvrtc {
    lib: libloading::Library,
    /// NVRTC dlopens its builtins by soname at compile time; loading them first from
    /// the same folder makes that work without LD_LIBRARY_PATH.
    _builtins: Option<libloading::Library>,
}

/// A compiled kernel file: its PTX, the cubin when compiled for a real architecture
/// (`sm_XY`), and NVRTC's log (warnings, if any).
#[derive(Debug, Clone)]
pub struct Compiled {
    pub ptx: String,
    pub cubin: Option<Vec<u8>>,
    pub log: String,
}

impl Nvrtc {
    pub fn load(path: &Path) -> Result<Self, NvrtcError> {
        let builtins = path.parent().and_then(|dir| {
            let found = std::fs::read_dir(dir)
                .ok()?
                .filter_map(Result::ok)
                .find(|e| e.file_name().to_string_lossy().starts_with("libnvrtc-builtins.so"))?;
            // SAFETY: loading the vendor's builtins library runs only its initializers.
            unsafe { libloading::Library::new(found.path()) }.ok()
        });
        // SAFETY: loading NVRTC runs its (trusted, vendor) initializers only.
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| NvrtcError::Load { path: path.display().to_string(), reason: e.to_string() })?;
        Ok(Self { lib, _builtins: builtins })
    }

    fn sym<T: Copy>(&self, name: &'static str) -> Result<T, NvrtcError> {
        let c = format!("{name}\0");
        // SAFETY: the symbol's type is the documented NVRTC C signature.
        unsafe { self.lib.get::<T>(c.as_bytes()).map(|s| *s).map_err(|_| NvrtcError::Symbol(name)) }
    }

    pub fn version(&self) -> Result<(i32, i32), NvrtcError> {
        let f: VersionFn = self.sym("nvrtcVersion")?;
        let (mut a, mut b) = (0, 0);
        // SAFETY: two valid out-pointers.
        let code = unsafe { f(&mut a, &mut b) };
        if code != 0 {
            return Err(NvrtcError::Call { name: String::new(), call: "nvrtcVersion", code });
        }
        Ok((a, b))
    }

    /// The real architectures this NVRTC can build cubins for, as `10 * major + minor`
    /// (90 is sm_90).
    pub fn supported_archs(&self) -> Result<Vec<i32>, NvrtcError> {
        let num: NumArchsFn = self.sym("nvrtcGetNumSupportedArchs")?;
        let get: ArchsFn = self.sym("nvrtcGetSupportedArchs")?;
        let mut n: c_int = 0;
        // SAFETY: one valid out-pointer.
        let code = unsafe { num(&mut n) };
        if code != 0 {
            return Err(NvrtcError::Call { name: String::new(), call: "nvrtcGetNumSupportedArchs", code });
        }
        let mut archs = vec![0 as c_int; usize::try_from(n).unwrap_or(0)];
        // SAFETY: room for the `n` entries NVRTC just said it will write.
        let code = unsafe { get(archs.as_mut_ptr()) };
        if code != 0 {
            return Err(NvrtcError::Call { name: String::new(), call: "nvrtcGetSupportedArchs", code });
        }
        Ok(archs)
    }

    /// Compile one source with the given headers and options.
    pub fn compile(
        &self,
        name: &str,
        source: &str,
        headers: &[(&str, &str)],
        options: &[String],
    ) -> Result<Compiled, NvrtcError> {
        let create: CreateFn = self.sym("nvrtcCreateProgram")?;
        let compile: CompileFn = self.sym("nvrtcCompileProgram")?;
        let log_size: SizeFn = self.sym("nvrtcGetProgramLogSize")?;
        let get_log: GetFn = self.sym("nvrtcGetProgramLog")?;
        let ptx_size: SizeFn = self.sym("nvrtcGetPTXSize")?;
        let get_ptx: GetFn = self.sym("nvrtcGetPTX")?;
        let cubin_size: SizeFn = self.sym("nvrtcGetCUBINSize")?;
        let get_cubin: GetFn = self.sym("nvrtcGetCUBIN")?;
        let destroy: DestroyFn = self.sym("nvrtcDestroyProgram")?;
        let c = |s: &str| CString::new(s).map_err(|_| NvrtcError::Nul);
        let src = c(source)?;
        let cname = c(name)?;
        let hdr_src: Vec<CString> = headers.iter().map(|(_, s)| c(s)).collect::<Result<_, _>>()?;
        let hdr_name: Vec<CString> = headers.iter().map(|(n, _)| c(n)).collect::<Result<_, _>>()?;
        let hdr_src_p: Vec<*const c_char> = hdr_src.iter().map(|s| s.as_ptr()).collect();
        let hdr_name_p: Vec<*const c_char> = hdr_name.iter().map(|s| s.as_ptr()).collect();
        let opts: Vec<CString> = options.iter().map(|o| c(o)).collect::<Result<_, _>>()?;
        let opts_p: Vec<*const c_char> = opts.iter().map(|s| s.as_ptr()).collect();
        let call = |call: &'static str, code: c_int| {
            if code == 0 { Ok(()) } else { Err(NvrtcError::Call { name: name.to_owned(), call, code }) }
        };
        let mut prog: Program = std::ptr::null_mut();
        // SAFETY: every pointer refers to a live NUL-terminated string or array of them,
        // with the counts passed alongside; `prog` is destroyed below on every path.
        unsafe {
            call(
                "nvrtcCreateProgram",
                create(
                    &mut prog,
                    src.as_ptr(),
                    cname.as_ptr(),
                    headers.len() as c_int,
                    hdr_src_p.as_ptr(),
                    hdr_name_p.as_ptr(),
                ),
            )?;
            let compiled = compile(prog, opts_p.len() as c_int, opts_p.as_ptr());
            let mut n = 0usize;
            let mut log = String::new();
            if log_size(prog, &mut n) == 0 && n > 1 {
                let mut buf = vec![0u8; n];
                if get_log(prog, buf.as_mut_ptr().cast()) == 0 {
                    log =
                        CStr::from_bytes_until_nul(&buf).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                }
            }
            let result = if compiled != 0 {
                Err(NvrtcError::Compile { name: name.to_owned(), log: log.clone() })
            } else {
                let mut n = 0usize;
                call("nvrtcGetPTXSize", ptx_size(prog, &mut n)).and_then(|()| {
                    let mut buf = vec![0u8; n.max(1)];
                    call("nvrtcGetPTX", get_ptx(prog, buf.as_mut_ptr().cast()))?;
                    let ptx =
                        CStr::from_bytes_until_nul(&buf).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                    // Zero bytes of cubin: the target was a virtual architecture.
                    let mut n = 0usize;
                    call("nvrtcGetCUBINSize", cubin_size(prog, &mut n))?;
                    let cubin = if n == 0 {
                        None
                    } else {
                        let mut bin = vec![0u8; n];
                        call("nvrtcGetCUBIN", get_cubin(prog, bin.as_mut_ptr().cast()))?;
                        Some(bin)
                    };
                    Ok(Compiled { ptx, cubin, log: log.trim().to_owned() })
                })
            };
            destroy(&mut prog);
            result
        }
    }
}

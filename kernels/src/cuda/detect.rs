//! Is there a CUDA driver and a device? Asked through a dynamically loaded libcuda
//! before any context exists, so a machine without either gets a reason, not a panic.

use std::ffi::{c_char, c_int, c_uint};

/// What the driver reports about device 0.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeviceInfo {
    pub name: String,
    pub total_memory_bytes: u64,
    pub compute_capability: (i32, i32),
    pub devices: i32,
    /// The newest CUDA the driver supports, `1000 * major + 10 * minor` (12040 is 12.4):
    /// it loads PTX only from an NVRTC no newer than this.
    pub driver_version: i32,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum CudaUnavailable {
    #[error("no CUDA driver library (libcuda.so.1) on this machine")]
    NoDriver,
    #[error("the CUDA driver failed to initialize (code {0})")]
    InitFailed(c_int),
    #[error("the CUDA driver reports no device")]
    NoDevice,
    #[error("the CUDA driver lacks {0}")]
    Symbol(&'static str),
}

type InitFn = unsafe extern "C" fn(c_uint) -> c_int;
type CountFn = unsafe extern "C" fn(*mut c_int) -> c_int;
type NameFn = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
type MemFn = unsafe extern "C" fn(*mut usize, c_int) -> c_int;
type AttrFn = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int;
type VersionFn = unsafe extern "C" fn(*mut c_int) -> c_int;

const ATTR_CC_MAJOR: c_int = 75;
const ATTR_CC_MINOR: c_int = 76;

/// Probe the driver and device 0.
pub fn probe() -> Result<DeviceInfo, CudaUnavailable> {
    // SAFETY: loading the vendor driver library runs only its own initializers.
    let lib = unsafe { libloading::Library::new("libcuda.so.1") }.map_err(|_| CudaUnavailable::NoDriver)?;
    // SAFETY: the types are the documented CUDA driver API signatures.
    unsafe {
        let sym = |n: &'static str| -> Result<*const (), CudaUnavailable> {
            lib.get::<*const ()>(format!("{n}\0").as_bytes()).map(|s| *s).map_err(|_| CudaUnavailable::Symbol(n))
        };
        let init: InitFn = std::mem::transmute(sym("cuInit")?);
        let count: CountFn = std::mem::transmute(sym("cuDeviceGetCount")?);
        let name: NameFn = std::mem::transmute(sym("cuDeviceGetName")?);
        let mem: MemFn = std::mem::transmute(sym("cuDeviceTotalMem_v2")?);
        let attr: AttrFn = std::mem::transmute(sym("cuDeviceGetAttribute")?);
        let version: VersionFn = std::mem::transmute(sym("cuDriverGetVersion")?);
        let code = init(0);
        if code != 0 {
            return Err(CudaUnavailable::InitFailed(code));
        }
        let mut n = 0;
        if count(&mut n) != 0 || n == 0 {
            return Err(CudaUnavailable::NoDevice);
        }
        let mut buf = [0 as c_char; 256];
        name(buf.as_mut_ptr(), buf.len() as c_int, 0);
        let name = std::ffi::CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned();
        let mut total = 0usize;
        mem(&mut total, 0);
        let (mut major, mut minor) = (0, 0);
        attr(&mut major, ATTR_CC_MAJOR, 0);
        attr(&mut minor, ATTR_CC_MINOR, 0);
        let mut driver_version = 0;
        version(&mut driver_version);
        Ok(DeviceInfo {
            name,
            total_memory_bytes: total as u64,
            compute_capability: (major, minor),
            devices: n,
            driver_version,
        })
    }
}

//! What the CUDA backend needs of a device, as a trait: memory, copies, kernel
//! launches and graph capture. [`super::driver::CudarcDevice`] is the GPU; the
//! `cuda-emulator` feature adds a CPU emulator that runs the same kernels, so the
//! backend's host code and the kernels' logic are tested on machines without a GPU.

use crate::gguf::GgmlType;

/// Every kernel the forward pass launches: (name, file) in `kernels/cuda`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    QuantizeAct,
    /// The quantized matrix product, one kernel per block type (see [`Kernel::matmul_q`]).
    MatmulQ(QuantType),
    /// Gate and up products, the activation and its quantization (`matmul_glu_*`).
    MatmulGlu(QuantType),
    MatmulF,
    Embed,
    AddNormQuant,
    /// QK-norm, RoPE, the KV-cache append and attention, in one kernel.
    Attention,
    GluQuant,
    SampleRows,
}

/// The block types with a quantized matrix product kernel: every block type the CPU
/// backend multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl QuantType {
    pub const ALL: [QuantType; 10] = [
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q5_1,
        QuantType::Q8_0,
        QuantType::Q2K,
        QuantType::Q3K,
        QuantType::Q4K,
        QuantType::Q5K,
        QuantType::Q6K,
    ];

    /// The kernels' type for a GGUF type; `None` for float and unsupported types.
    pub fn of(ty: GgmlType) -> Option<Self> {
        Some(match ty {
            GgmlType::Q4_0 => Self::Q4_0,
            GgmlType::Q4_1 => Self::Q4_1,
            GgmlType::Q5_0 => Self::Q5_0,
            GgmlType::Q5_1 => Self::Q5_1,
            GgmlType::Q8_0 => Self::Q8_0,
            GgmlType::Q2_K => Self::Q2K,
            GgmlType::Q3_K => Self::Q3K,
            GgmlType::Q4_K => Self::Q4K,
            GgmlType::Q5_K => Self::Q5K,
            GgmlType::Q6_K => Self::Q6K,
            _ => return None,
        })
    }

    pub fn ggml(self) -> GgmlType {
        match self {
            Self::Q4_0 => GgmlType::Q4_0,
            Self::Q4_1 => GgmlType::Q4_1,
            Self::Q5_0 => GgmlType::Q5_0,
            Self::Q5_1 => GgmlType::Q5_1,
            Self::Q8_0 => GgmlType::Q8_0,
            Self::Q2K => GgmlType::Q2_K,
            Self::Q3K => GgmlType::Q3_K,
            Self::Q4K => GgmlType::Q4_K,
            Self::Q5K => GgmlType::Q5_K,
            Self::Q6K => GgmlType::Q6_K,
        }
    }
}

impl Kernel {
    pub const ALL: [Kernel; 27] = [
        Kernel::QuantizeAct,
        Kernel::MatmulQ(QuantType::Q4_0),
        Kernel::MatmulQ(QuantType::Q4_1),
        Kernel::MatmulQ(QuantType::Q5_0),
        Kernel::MatmulQ(QuantType::Q5_1),
        Kernel::MatmulQ(QuantType::Q8_0),
        Kernel::MatmulQ(QuantType::Q2K),
        Kernel::MatmulQ(QuantType::Q3K),
        Kernel::MatmulQ(QuantType::Q4K),
        Kernel::MatmulQ(QuantType::Q5K),
        Kernel::MatmulQ(QuantType::Q6K),
        Kernel::MatmulGlu(QuantType::Q4_0),
        Kernel::MatmulGlu(QuantType::Q4_1),
        Kernel::MatmulGlu(QuantType::Q5_0),
        Kernel::MatmulGlu(QuantType::Q5_1),
        Kernel::MatmulGlu(QuantType::Q8_0),
        Kernel::MatmulGlu(QuantType::Q2K),
        Kernel::MatmulGlu(QuantType::Q3K),
        Kernel::MatmulGlu(QuantType::Q4K),
        Kernel::MatmulGlu(QuantType::Q5K),
        Kernel::MatmulGlu(QuantType::Q6K),
        Kernel::MatmulF,
        Kernel::Embed,
        Kernel::AddNormQuant,
        Kernel::Attention,
        Kernel::GluQuant,
        Kernel::SampleRows,
    ];

    /// The quantized matrix product for weights of type `ty`, if the kernels have one.
    pub fn matmul_q(ty: GgmlType) -> Option<Kernel> {
        QuantType::of(ty).map(Kernel::MatmulQ)
    }

    /// The fused gate/up/activation/quantization for FFN weights of type `ty`.
    pub fn matmul_glu(ty: GgmlType) -> Option<Kernel> {
        QuantType::of(ty).map(Kernel::MatmulGlu)
    }

    /// The `extern "C"` name in the source.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::QuantizeAct => "quantize_act",
            Kernel::MatmulQ(t) => match t {
                QuantType::Q4_0 => "matmul_q4_0",
                QuantType::Q4_1 => "matmul_q4_1",
                QuantType::Q5_0 => "matmul_q5_0",
                QuantType::Q5_1 => "matmul_q5_1",
                QuantType::Q8_0 => "matmul_q8_0",
                QuantType::Q2K => "matmul_q2_k",
                QuantType::Q3K => "matmul_q3_k",
                QuantType::Q4K => "matmul_q4_k",
                QuantType::Q5K => "matmul_q5_k",
                QuantType::Q6K => "matmul_q6_k",
            },
            Kernel::MatmulGlu(t) => match t {
                QuantType::Q4_0 => "matmul_glu_q4_0",
                QuantType::Q4_1 => "matmul_glu_q4_1",
                QuantType::Q5_0 => "matmul_glu_q5_0",
                QuantType::Q5_1 => "matmul_glu_q5_1",
                QuantType::Q8_0 => "matmul_glu_q8_0",
                QuantType::Q2K => "matmul_glu_q2_k",
                QuantType::Q3K => "matmul_glu_q3_k",
                QuantType::Q4K => "matmul_glu_q4_k",
                QuantType::Q5K => "matmul_glu_q5_k",
                QuantType::Q6K => "matmul_glu_q6_k",
            },
            Kernel::MatmulF => "matmul_f",
            Kernel::Embed => "embed",
            Kernel::AddNormQuant => "add_norm_quant",
            Kernel::Attention => "attention",
            Kernel::GluQuant => "glu_quant",
            Kernel::SampleRows => "sample_rows",
        }
    }

    /// The file (in [`super::SOURCES`]) that defines it.
    pub fn file(self) -> &'static str {
        match self {
            Kernel::QuantizeAct | Kernel::MatmulQ(_) | Kernel::MatmulGlu(_) | Kernel::MatmulF | Kernel::Embed => {
                "quant.cu"
            }
            Kernel::AddNormQuant => "norm.cu",
            Kernel::Attention => "attention.cu",
            Kernel::GluQuant => "ffn.cu",
            Kernel::SampleRows => "sampling.cu",
        }
    }
}

/// One kernel argument. Every argument travels in an 8-byte slot, little-endian, so a
/// 4-byte parameter reads the slot's first 4 bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    /// A device address.
    Ptr(u64),
    I32(i32),
    F32(f32),
}

impl Arg {
    pub fn slot(self) -> u64 {
        match self {
            Arg::Ptr(p) => p,
            Arg::I32(v) => u64::from(v as u32),
            Arg::F32(v) => u64::from(v.to_bits()),
        }
    }
}

/// Launch shape: blocks in the grid, threads in a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub grid: [u32; 3],
    pub block: [u32; 3],
}

impl Shape {
    pub fn new(grid: (u32, u32), block: u32) -> Self {
        Self { grid: [grid.0.max(1), grid.1.max(1), 1], block: [block, 1, 1] }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum CudaError {
    #[error("CUDA is not available: {0}")]
    Unavailable(#[from] super::detect::CudaUnavailable),
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    #[error("CUDA driver call {call} failed: {reason}")]
    Driver { call: &'static str, reason: String },
    #[error("device memory: cannot allocate {bytes} bytes ({reason})")]
    OutOfMemory { bytes: usize, reason: String },
    #[error("kernel {kernel} failed to launch: {reason}")]
    Launch { kernel: &'static str, reason: String },
    #[error("a sequence's cache belongs to another backend or model")]
    ForeignSequence,
    #[error("the CUDA backend needs widths that are multiples of 32; this model has {0}")]
    UnsupportedShape(String),
    #[error("the CUDA backend does not run the `{0}` architecture yet; use the CPU backend")]
    UnsupportedArch(&'static str),
    #[error("the CUDA backend has no matrix product for {0} weights (tensor {1}); use the CPU backend")]
    UnsupportedType(GgmlType, String),
    #[error("known-answer self-test failed: {0}")]
    SelfTest(String),
    #[error(transparent)]
    FloatEnv(#[from] crate::fpenv::FlushToZero),
}

/// A device that runs the kernels. Addresses are plain `u64`s; buffers own memory.
pub trait Device: Send + Sync + 'static {
    type Buffer: Send + Sync + 'static;
    type Graph: Send + 'static;

    /// Zero-filled memory of `bytes` bytes, aligned to at least 256.
    fn alloc(&self, bytes: usize) -> Result<Self::Buffer, CudaError>;
    fn addr(&self, buf: &Self::Buffer) -> u64;
    /// Copy host bytes to a device address (ordered with launches).
    fn upload(&self, dst: u64, src: &[u8]) -> Result<(), CudaError>;
    /// Copy device bytes to the host, after all work queued so far.
    fn download(&self, src: u64, dst: &mut [u8]) -> Result<(), CudaError>;
    /// Copy between device addresses (ordered with launches).
    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<(), CudaError>;
    /// Wait for all queued work.
    fn synchronize(&self) -> Result<(), CudaError>;
    fn launch(&self, kernel: Kernel, shape: Shape, args: &[Arg]) -> Result<(), CudaError>;
    /// Record the launches that follow instead of running them…
    fn begin_capture(&self) -> Result<(), CudaError>;
    /// …until here; the result replays them.
    fn end_capture(&self) -> Result<Self::Graph, CudaError>;
    fn replay(&self, graph: &Self::Graph) -> Result<(), CudaError>;
    /// (free, total) bytes of device memory.
    fn memory(&self) -> Result<(u64, u64), CudaError>;
    fn name(&self) -> String;
    fn compute_capability(&self) -> (i32, i32);
}

/// The bytes of a slice of plain numbers, for uploads and downloads.
pub fn bytes_of<T: Plain>(v: &[T]) -> &[u8] {
    // SAFETY: `Plain` types have no padding and every bit pattern is valid.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

pub fn bytes_of_mut<T: Plain>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: as above; any bytes written are a valid `T`.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), std::mem::size_of_val(v)) }
}

/// Numbers without padding for which every bit pattern is a value.
pub trait Plain: Copy + sealed::Sealed {}
impl Plain for f32 {}
impl Plain for u32 {}
impl Plain for i32 {}
impl Plain for u64 {}
impl Plain for u8 {}
mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for u32 {}
    impl Sealed for i32 {}
    impl Sealed for u64 {}
    impl Sealed for u8 {}
}
